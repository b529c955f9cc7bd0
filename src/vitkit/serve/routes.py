"""The endpoints: classify and explain an upload, classify it by labels given as text and
embed it (or texts) with a CLIP, describe the model, report batching, serve the page. Each
reads the `Service` the app keeps in `app.state.service`.

Images are decoded and preprocessed per request, in a small thread pool, before they are
queued for the batcher. Explanations (an fp32 pass, a backward pass for grad-rollout) run one
at a time on a thread of their own, with one core, so predictions go on meanwhile. A request
that would wait beyond the batcher's queue, or beyond `max_explanations` explanations at once,
gets 503 with Retry-After rather than piling up.

Zero-shot classification and a CLIP's image embeddings queue the image for the batcher like a
prediction (the image tower's output is the embedding); the text tower's work, and a plain
ViT's pooled embeddings, run on the model's thread between batches, at most
`max_encodings` at once (`vitkit.serve.text`).

The model's inspection (/v1/inspect: filters, position embeddings, attention distances) is
computed once, when first asked for, on the explanations' thread, then kept.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

import torch
import torch.nn.functional as F
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from vitkit.data.preprocess import preprocess
from vitkit.infer.embed import embed_images
from vitkit.infer.explain import METHODS, explain_image
from vitkit.infer.inspect import inspect_model
from vitkit.model.vit import ViT
from vitkit.serve.batcher import Answer, Labels, MicroBatcher, QueueFull
from vitkit.serve.decode import (
    DEFAULT_READ_TIMEOUT_S,
    ApiError,
    decode_image,
    parse_top_k,
    read_upload,
)
from vitkit.serve.engine import Engine
from vitkit.serve.schemas import (
    DEFAULT_TOP_K,
    EMBED_BODY,
    ERRORS,
    EXPLAIN_BODY,
    EXPLAIN_RESPONSES,
    PREDICT_BODY,
    ZERO_SHOT_BODY,
    EmbedOut,
    PredictOut,
    ZeroShotOut,
    label_rows,
)
from vitkit.serve.text import DEFAULT_MAX_ENCODINGS, Slots, TextSide

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Decoding threads bound how many uploads are held decoded in memory at once.
_DECODE_WORKERS = min(4, os.cpu_count() or 1)
# A busy service's answer: the queue drains within about a second under normal load.
_RETRY_AFTER = {"Retry-After": "1"}
# /v1/inspect measures attention on at most this many of the model's calibration images (its
# own training images), once: under a second on one core for the shipped model.
PROBE_IMAGES = 64

T = TypeVar("T")


class Service:
    """One model behind the endpoints: its batcher, its decoding threads, its limits.

    `model` is the fp32 model, for explanations; `batcher.model` the one that predicts.
    `info` is the body of /v1/model. `text`: a CLIP's text side (None for other models);
    `encodings` bound the work on the model's thread outside batches.
    """

    def __init__(
        self,
        name: str,
        model: ViT,
        batcher: MicroBatcher,
        max_upload_bytes: int,
        max_pixels: int,
        info: dict[str, Any],
        max_explanations: int = 2,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        text: TextSide | None = None,
        encodings: Slots | None = None,
    ) -> None:
        self.name, self.model, self.batcher, self.info = name, model, batcher, info
        self.text = text
        self.encodings = encodings or Slots(DEFAULT_MAX_ENCODINGS, "text encodings or embeddings")
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.read_timeout_s = read_timeout_s
        self.max_explanations = max_explanations
        self._explaining = 0
        self._decoder: ThreadPoolExecutor | None = None
        self._compiling: asyncio.Task[None] | None = None
        self._explainer: ThreadPoolExecutor | None = None
        self._inspection: asyncio.Future[dict[str, Any]] | None = None

    @property
    def engine(self) -> Engine:
        return cast(Engine, self.batcher.model)

    def start(self) -> None:
        self._decoder = ThreadPoolExecutor(_DECODE_WORKERS, thread_name_prefix="vitkit-decode")
        # torch's thread count is per thread: explanations get one core, predictions the rest.
        self._explainer = ThreadPoolExecutor(
            1, "vitkit-explain", initializer=torch.set_num_threads, initargs=(1,)
        )
        self.batcher.start()
        # Loading (or building) the compiled model must not delay the first answers.
        self._compiling = asyncio.get_running_loop().create_task(self.engine.run())

    async def stop(self) -> None:
        if self._compiling is not None:
            self._compiling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._compiling
        await self.engine.stop()
        await self.batcher.stop()
        for pool in (self._decoder, self._explainer):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    async def decode(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a decoding thread."""
        return await asyncio.get_running_loop().run_in_executor(self._decoder, fn, *args)

    async def explain(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the explanations' thread (the model is only read there, with
        autograd on in that thread alone, so predictions may use it at the same time)."""
        return await asyncio.get_running_loop().run_in_executor(self._explainer, fn, *args)

    async def inspection(self) -> dict[str, Any]:
        """The body of /v1/inspect: computed on the explanations' thread by the first request
        (later ones wait for the same work), then kept; a failure is tried again next time."""
        if self._inspection is None:
            self._inspection = asyncio.ensure_future(self.explain(_inspect, self.model))
        work = self._inspection
        try:  # shielded: a client that leaves does not cancel the work the others wait for
            return await asyncio.shield(work)
        except Exception:
            if self._inspection is work and work.done():
                self._inspection = None
            raise

    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        """Around one explanation: a 503 when `max_explanations` are running or waiting
        already, as each takes far longer than a batch."""
        if self._explaining >= self.max_explanations:
            raise ApiError(
                503,
                f"{self.max_explanations} explanations are running already; retry shortly",
                _RETRY_AFTER,
            )
        self._explaining += 1
        try:
            yield
        finally:
            self._explaining -= 1

    def submit(self, inputs: torch.Tensor, k: int) -> asyncio.Future[Answer]:
        """Queues the inputs for the batcher; a 503 when its queue is full."""
        try:
            return self.batcher.submit(inputs, k)
        except QueueFull:
            raise _busy(self.batcher) from None

    def inputs(self, data: bytes) -> torch.Tensor:
        """Uploaded bytes as the model's normalised (1, C, S, S) input."""
        config = self.model.config
        return preprocess(decode_image(data, config, self.max_pixels)[None], config)

    def text_side(self) -> TextSide:
        """The CLIP's text side; a 400 for a model without a text tower."""
        if self.text is None:
            raise ApiError(
                400,
                f"the model {self.name!r} has no text tower (it is not a CLIP): labels and "
                "texts need one; serve a CLIP model directory",
            )
        return self.text

    def top_k(self, fields: dict[str, Any], query: int | None) -> int:
        """`top_k` from the body's fields, else the query, else the default; at most every class."""
        k = parse_top_k(fields.get("top_k", query or DEFAULT_TOP_K))
        return min(k, self.model.config.num_classes)


def _busy(batcher: MicroBatcher) -> ApiError:
    """The 503 for a request that finds the batcher's queue full."""
    message = f"the service is busy: {batcher.max_queue} images are waiting for the model already"
    return ApiError(503, f"{message}; retry shortly", _RETRY_AFTER)


router = APIRouter()
TopK = Annotated[int | None, Query(ge=1, description="how many labels")]


def _service(request: Request) -> Service:
    return request.app.state.service


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


@router.post(
    "/v1/predict",
    summary="Classify an image",
    response_model=PredictOut,
    responses=ERRORS,
    openapi_extra=PREDICT_BODY,
)
async def predict(request: Request, top_k: TopK = None) -> JSONResponse:
    """The image's most probable labels. Send the image as a multipart upload (field
    `file`), as JSON `{"image": "<base64>"}`, or as the raw bytes with an image/* type;
    `top_k` (default 5) may come in the body or the query."""
    start = time.perf_counter()
    service = _service(request)
    if service.text is not None:  # a CLIP's head is a projection: its outputs are no classes
        raise ApiError(
            400,
            f"the model {service.name!r} is a CLIP: it classifies into labels you write, "
            "POST the image with them to /v1/zero-shot",
        )
    if service.batcher.full:  # refused before its upload is read: waiting for it buys nothing
        raise _busy(service.batcher)
    with service.batcher.incoming():
        data, fields = await read_upload(request, service.max_upload_bytes, service.read_timeout_s)
        k = service.top_k(fields, top_k)
        result = service.submit(await service.decode(service.inputs, data), k)
    answer = await result
    return JSONResponse(
        {
            "labels": label_rows(answer.labels),
            "model": service.name,
            "mode": answer.mode,
            "latency_ms": _ms_since(start),
        }
    )


@router.post(
    "/v1/explain",
    summary="Show where the model looked",
    response_class=Response,
    responses=EXPLAIN_RESPONSES,
    openapi_extra=EXPLAIN_BODY,
)
async def explain(
    request: Request,
    top_k: TopK = None,
    method: Annotated[str | None, Query(description="default: rollout")] = None,
    fmt: Annotated[Literal["png", "json"], Query(alias="format")] = "png",
) -> Response:
    """The attention map over the image, from `vitkit.infer.explain`: the same inputs as
    /v1/predict, plus `method` (default rollout) in the body or the query."""
    start = time.perf_counter()
    service = _service(request)
    with service.explaining():
        data, fields = await read_upload(request, service.max_upload_bytes, service.read_timeout_s)
        k = service.top_k(fields, top_k)
        how = fields.get("method", method or "rollout")
        if how not in METHODS:
            raise ApiError(422, f"method must be one of {', '.join(METHODS)}, got {how!r}")
        config, limit = service.model.config, service.max_pixels
        pixels = await service.decode(decode_image, data, config, limit)
        labels, heatmap, png = await service.explain(_explain, service.model, pixels, how, k)
    rows, latency = label_rows(labels), _ms_since(start)
    if fmt == "json":
        return JSONResponse(
            {
                "labels": rows,
                "method": how,
                "heatmap": heatmap,
                "overlay_png": base64.b64encode(png).decode(),
                "model": service.name,
                "latency_ms": latency,
            }
        )
    # JSON's ASCII escapes keep any label name a valid header value.
    headers = {"X-Labels": json.dumps(rows), "X-Latency-Ms": str(latency)}
    return Response(png, media_type="image/png", headers=headers)


def _explain(
    model: ViT, pixels: torch.Tensor, how: str, k: int
) -> tuple[Labels, list[list[float]], bytes]:
    """The top-k labels, the heatmap and the overlay as PNG, for uint8 (C, S, S) pixels (as
    decoded and cropped already: a tensor, so that they are not cropped again)."""
    result = explain_image(model, pixels, how, k)
    png = io.BytesIO()
    result.overlay().save(png, "PNG")
    return result.labels, result.heatmap.round(4).tolist(), png.getvalue()


@router.get(
    "/v1/inspect",
    summary="What the model learnt: filters, position embeddings, attention distances",
)
async def inspection(request: Request) -> JSONResponse:
    """The analyses of the ViT paper (`vitkit inspect`): the filters that first see the
    pixels, the similarity of the position embeddings, and each layer's and head's mean
    attention distance (pixels) and entropy (nats), measured on a sample of the model's
    calibration images (its own training images; a model without them has `attention`
    null). The numbers, a `summary` in words and the `figures` as base64 PNGs; computed
    once, then kept."""
    service = _service(request)
    return JSONResponse({**await service.inspection(), "model": service.name})


def _inspect(model: ViT) -> dict[str, Any]:
    """The inspection's numbers, its summary and its figures (base64 PNGs)."""
    grid = 2 * model.config.grid_size
    result = inspect_model(model, model.calibration, PROBE_IMAGES, grid, progress=False)
    figures = {name: base64.b64encode(png).decode() for name, png in result.pngs().items()}
    return {**result.to_dict(), "summary": result.summary(), "figures": figures}


LabelsQuery = Annotated[
    str | None,
    Query(description="comma-separated labels (for a raw image body; else in the body)"),
]
TemplatesQuery = Annotated[
    list[str] | None, Query(description='prompt templates, each with one "{}" (repeatable)')
]


@router.post(
    "/v1/zero-shot",
    summary="Classify an image by labels given as text (CLIP)",
    response_model=ZeroShotOut,
    responses=ERRORS,
    openapi_extra=ZERO_SHOT_BODY,
)
async def zero_shot(
    request: Request,
    top_k: TopK = None,
    labels: LabelsQuery = None,
    templates: TemplatesQuery = None,
) -> JSONResponse:
    """The labels ranked by probability for the image: softmax over the CLIP's scaled cosine
    similarities between the image and each label's prompts (averaged over the templates).
    The image as for /v1/predict, with `labels` (a JSON list, or comma-separated in a form
    field or the query), optional `templates` and `top_k` (default: every label). A label
    set's embeddings are cached: sending the same labels again costs only the image."""
    start = time.perf_counter()
    service = _service(request)
    text = service.text_side()  # before the body is read, as a busy service's 503
    if service.batcher.full:
        raise _busy(service.batcher)
    with service.batcher.incoming():
        data, fields = await read_upload(request, service.max_upload_bytes, service.read_timeout_s)
        names = text.labels(fields.get("labels", labels))
        prompts = text.templates(fields.get("templates", templates), len(names))
        k = min(parse_top_k(fields.get("top_k", top_k or len(names))), len(names))
        image = service.submit(await service.decode(service.inputs, data), 0)
    try:
        classes, cached = await text.class_embeddings(names, prompts)
    except BaseException:
        image.cancel()  # the batcher skips it
        raise
    answer = await image
    assert answer.output is not None
    ranked = text.rank(answer.output, classes, names, k)
    return JSONResponse(
        {
            "labels": label_rows(ranked),
            "templates": prompts,
            "cached": cached,
            "model": service.name,
            "mode": answer.mode,
            "latency_ms": _ms_since(start),
        }
    )


@router.post(
    "/v1/embed",
    summary="Embed an image (or, with a CLIP, texts)",
    response_model=EmbedOut,
    responses=ERRORS,
    openapi_extra=EMBED_BODY,
)
async def embed(request: Request) -> JSONResponse:
    """L2-normalised embeddings. An image as for /v1/predict: a CLIP's image embedding (its
    image tower's output, in the space it shares with texts), or another model's pooled
    features (what its head reads). With a CLIP, `"text"` (a string or a list of strings)
    instead of an image embeds texts into the same space."""
    start = time.perf_counter()
    service = _service(request)
    if service.batcher.full:
        raise _busy(service.batcher)
    with service.batcher.incoming():
        data, fields = await read_upload(
            request, service.max_upload_bytes, service.read_timeout_s, image_required=False
        )
        if not data and "text" in fields:
            texts = service.text_side().texts(fields["text"])
        elif not data:
            raise ApiError(422, 'send an image (as for /v1/predict) or, for a CLIP, "text"')
        elif "text" in fields:
            raise ApiError(400, 'send an image or "text", not both')
        elif service.text is not None:  # the image tower's output, batched as predictions
            texts, queued = None, service.submit(await service.decode(service.inputs, data), 0)
        else:
            texts, pixels = None, await service.decode(_pixels, service, data)
    if texts is not None:  # the text tower runs in fp32
        rows = await service.text_side().embed(texts)
        kind, source, mode = "text", "text tower", "eager-fp32"
    elif service.text is not None:
        answer = await queued
        assert answer.output is not None
        rows = F.normalize(answer.output[None].float(), dim=-1)
        kind, source, mode = "image", "projection", answer.mode
    else:  # pooled features: not what the engine computes, so on the model's thread
        with service.encodings.held():
            rows = await service.batcher.call(_pooled, service.model, pixels)
        kind, source, mode = "image", "pooled", "eager-fp32"
    return JSONResponse(
        {
            "embeddings": rows.tolist(),
            "dim": rows.shape[1],
            "kind": kind,
            "source": source,
            "model": service.name,
            "mode": mode,
            "latency_ms": _ms_since(start),
        }
    )


def _pixels(service: Service, data: bytes) -> torch.Tensor:
    """Uploaded bytes as uint8 (1, C, S, S) pixels, decoded and cropped for the model."""
    return decode_image(data, service.model.config, service.max_pixels)[None]


def _pooled(model: ViT, pixels: torch.Tensor) -> torch.Tensor:
    """The L2-normalised pooled features (1, D) of uint8 pixels (`vitkit.infer.embed`)."""
    return embed_images(model, pixels, progress=False)


@router.get("/v1/model", summary="The model: configuration, labels, preprocessing, limits")
async def model_info(request: Request) -> dict[str, Any]:
    service = _service(request)
    engine = service.engine
    compiled = engine.compiled
    precision = compiled.precision if compiled else engine.eager.precision
    return {**service.info, "precision": precision, "mode": engine.mode}


@router.get("/v1/stats", summary="How requests have been batched")
async def stats(request: Request) -> dict[str, Any]:
    batcher = _service(request).batcher
    sizes = batcher.batch_sizes
    batches, images = sum(sizes.values()), sum(s * n for s, n in sizes.items())
    return {
        "batches": batches,
        "images": images,
        "mean_batch_size": round(images / batches, 3) if batches else None,
        "batch_sizes": {str(s): n for s, n in sorted(sizes.items())},
        "queued": batcher.queued,
    }


@router.get("/healthz", summary="Whether the service can classify")
async def healthz(request: Request) -> JSONResponse:
    service = _service(request)
    if not service.batcher.running:
        return JSONResponse({"status": "down", "error": "the model worker has stopped"}, 503)
    return JSONResponse({"status": "ok", "model": service.name})


@router.get("/readyz", summary="Which mode serves each batch size; whether compiling is done")
async def readyz(
    request: Request,
    full_speed: Annotated[
        bool, Query(description="answer 503 until the compiled model serves")
    ] = False,
) -> JSONResponse:
    """200 when the service answers predictions (from the eager model at first; `mode` says
    which). With `full_speed=true`, 503 until a compiled model serves, for a load balancer
    that should send traffic only then."""
    service = _service(request)
    status = service.engine.status()
    ready = service.batcher.running and (not full_speed or service.engine.compiled is not None)
    return JSONResponse({"ready": ready, "model": service.name, **status}, 200 if ready else 503)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")
