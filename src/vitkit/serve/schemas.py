"""What the endpoints take and return, as the OpenAPI document shows it.

The image endpoints parse their bodies themselves (multipart, JSON or raw bytes, see
`vitkit.serve.decode`), so their request bodies are described here by hand.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from vitkit.infer.explain import METHODS
from vitkit.model.vit import ViT, count_params

DEFAULT_TOP_K = 5


class LabelOut(BaseModel):
    label: str
    probability: float


class PredictOut(BaseModel):
    labels: list[LabelOut]
    model: str
    latency_ms: float


class ZeroShotOut(BaseModel):
    labels: list[LabelOut]
    templates: list[str]
    cached: bool
    model: str
    mode: str
    latency_ms: float


class EmbedOut(BaseModel):
    embeddings: list[list[float]]
    dim: int
    kind: str
    source: str
    model: str
    latency_ms: float


class ErrorOut(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": why}
    for status, why in [
        (
            400,
            "malformed multipart, JSON or base64; bad or too many labels, templates or texts; "
            "labels or texts for a model without a text tower",
        ),
        (401, "no API key, or a wrong one, where the service has one (Authorization: Bearer)"),
        (408, "the body did not all arrive within the read timeout"),
        (413, "body over the size limit, or an image over the pixel limit"),
        (415, "a content type other than multipart/form-data, application/json or image/*"),
        (422, "not a readable image, or a bad parameter"),
        (503, "too many requests waiting: retry after the Retry-After header's seconds"),
    ]
}

EXPLAIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the attention overlay as PNG, the top labels in the X-Labels "
        "header (JSON); with format=json, JSON with labels, method, heatmap (the grid, "
        "scaled to [0, 1]), overlay_png (base64), model and latency_ms",
        "content": {"image/png": {}},
    },
    **ERRORS,
}


def _image_body(
    top_k: Any = DEFAULT_TOP_K, image_required: bool = True, **fields: dict[str, Any]
) -> dict[str, Any]:
    """The OpenAPI request body of an image endpoint, with `fields` beside the image (and
    `top_k`, with its default, unless None)."""
    if top_k is not None:
        fields = {"top_k": {"type": "integer", "minimum": 1, "default": top_k}, **fields}
    image = "the image file, base64-encoded (a data: URL is accepted too)"
    file_required, image_key = (["file"], ["image"]) if image_required else ([], [])
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": file_required,
                        "properties": {"file": {"type": "string", "format": "binary"}, **fields},
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": image_key,
                        "properties": {"image": {"type": "string", "description": image}, **fields},
                    }
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


PREDICT_BODY = _image_body()
EXPLAIN_BODY = _image_body(method={"type": "string", "enum": list(METHODS)})
_STRINGS = {"type": "array", "items": {"type": "string"}}
ZERO_SHOT_BODY = _image_body(
    top_k="all the labels",
    labels={
        "description": "the labels: a JSON list, or comma-separated text in a form field",
        "oneOf": [_STRINGS, {"type": "string"}],
    },
    templates={
        "description": 'prompt templates with one "{}" for the label (default: '
        '["a photo of a {}."]): a JSON list, or in a form field one template or a JSON list',
        "oneOf": [_STRINGS, {"type": "string"}],
    },
)
EMBED_BODY = _image_body(
    top_k=None,
    image_required=False,
    text={
        "description": "for a CLIP, instead of an image: a text or a list of texts to embed",
        "oneOf": [_STRINGS, {"type": "string"}],
    },
)


def model_info(
    name: str,
    model: ViT,
    precision: str,
    limits: dict[str, Any],
    text_tower: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of /v1/model: the model's configuration, labels, preprocessing, `limits`, and
    for a CLIP its `text_tower` (zero-shot classification and text embeddings)."""
    config = model.config
    # /v1/embed's image embeddings: a CLIP's projection into its joint space, else the
    # features the head reads.
    dim, source = (config.num_classes, "projection") if text_tower else (config.width, "pooled")
    return {
        "name": name,
        "precision": precision,
        "parameters": count_params(model),
        "config": config.to_dict(),
        "labels": model.labels or [str(i) for i in range(config.num_classes)],
        "preprocessing": {
            "image_size": config.image_size,
            "channels": config.in_channels,
            "mean": list(config.mean),
            "std": list(config.std),
            "interpolation": config.interpolation,
            "crop_pct": config.crop_pct,
        },
        "limits": limits,
        "zero_shot": text_tower is not None,
        "text_tower": text_tower,
        "embedding": {"dim": dim, "image": source, "text": text_tower is not None},
    }


def label_rows(labels: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """(label, probability) pairs as the JSON rows of a response."""
    return [{"label": label, "probability": p} for label, p in labels]
