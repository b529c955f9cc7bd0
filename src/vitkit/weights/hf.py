"""Hugging Face `transformers` ViT directories <-> vitkit.

Reads `ViTModel` and `ViTForImageClassification` checkpoints (config.json + model.safetensors
or pytorch_model.bin) and writes directories that `ViTForImageClassification.from_pretrained`
loads. Tensor names are those of the files on disk. The pieces every Hugging Face family
shares (finding the files, renaming tensors by a layout, config fields, preprocessing) live
here too; hf_families.py reads DINOv2 and CLIP with them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from vitkit.config import ViTConfig, brief
from vitkit.model.vit import ViT, state_shapes
from vitkit.weights.foreign import read_state_dict
from vitkit.weights.format import (
    CheckpointError,
    atomic_write,
    read_json,
    reading,
    shape_problems,
)


@dataclass(frozen=True)
class HFLayout:
    """Where a Hugging Face model keeps vitkit's tensors: Hugging Face name -> vitkit name."""

    top: dict[str, str]  # outside the blocks
    blocks: str  # the prefix of block {i}
    block: dict[str, str]  # within a block: "<blocks><hf>" -> "blocks.{i}.<vitkit>"
    # vitkit's fused qkv projection is these three, stacked in this order.
    qkv: tuple[str, str, str]
    # Tensors read and dropped (a pretraining-only mask token, an unused pooler).
    unused: tuple[str, ...] = field(default=())


# Hugging Face name -> vitkit name, outside the blocks.
HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Within block i: "encoder.layer.{i}.<hf>" -> "blocks.{i}.<vitkit>".
HF_BLOCK = {
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
}
HF_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
HF_HEAD = {"classifier.weight": "head.weight", "classifier.bias": "head.bias"}
# ViTModel's pooler (a dense layer + tanh on [CLS]) feeds no head vitkit has.
HF_VIT = HFLayout(HF_TOP, "encoder.layer.{i}.", HF_BLOCK, HF_QKV, unused=("pooler.",))
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PREPROCESSOR_FILE = "preprocessor_config.json"
# preprocessor_config.json names resampling filters by their Pillow numbers.
PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}
# config.json's hidden_act -> vitkit's act. gelu_new is the tanh approximation (written out).
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}


def config_from_hf(hf: Any, has_head: bool) -> tuple[ViTConfig, list[str] | None]:
    """A ViTConfig (and labels) from a Hugging Face ViT config.json."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"a config must be a JSON object, got {type(hf).__name__}")
    if hf.get("model_type") != "vit":
        raise CheckpointError(
            f"not a Hugging Face ViT config (model_type {brief(hf.get('model_type'))})"
        )
    labels = labels_from_hf(hf.get("id2label")) if has_head else None
    width, channels = positive_int(hf, "hidden_size", 768), positive_int(hf, "num_channels", 3)
    config = ViTConfig(
        image_size=positive_int(hf, "image_size", 224),
        patch_size=positive_int(hf, "patch_size", 16),
        in_channels=channels,
        num_classes=len(labels) if labels else 0,
        width=width,
        depth=positive_int(hf, "num_hidden_layers", 12),
        heads=positive_int(hf, "num_attention_heads", 12),
        mlp_ratio=mlp_ratio(width, positive_int(hf, "intermediate_size", 4 * width)),
        qkv_bias=hf.get("qkv_bias", True),
        ln_eps=layer_norm_eps(hf, 1e-12),
        act=activation_from_hf(hf, "gelu"),
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        interpolation="bilinear",
    )
    return config, labels


def positive_int(hf: dict[str, Any], key: str, default: int) -> int:
    """A config.json size, `default` where it is absent."""
    value = hf.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{key} must be a positive integer, got {brief(value)}")
    return value


def mlp_ratio(width: int, hidden: int) -> float:
    """The mlp_ratio that gives `hidden` MLP units (ViTConfig rounds width x ratio down, and
    hidden / width can fall a hair short: 8192 / 1664 x 1664 is 8191.99...)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else math.nextafter(ratio, math.inf)


def layer_norm_eps(hf: dict[str, Any], default: float) -> float:
    """config.json's layer_norm_eps (an int too large for a float is ViTConfig's to refuse)."""
    eps = hf.get("layer_norm_eps", default)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise CheckpointError(f"layer_norm_eps must be a number, got {brief(eps)}")
    return eps


def activation_from_hf(hf: dict[str, Any], default: str) -> str:
    """vitkit's `act` for config.json's hidden_act."""
    act = hf.get("hidden_act", default)
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"hidden_act {brief(act)} is not supported (vitkit builds {', '.join(HF_ACTIVATIONS)})"
        )
    return HF_ACTIVATIONS[act]


def labels_from_hf(id2label: Any) -> list[str] | None:
    """Class names from `id2label`, whose keys must be the class indices 0, 1, ..."""
    if not id2label:
        return None
    if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()):
        raise CheckpointError("id2label must be a JSON object of class names")
    if set(id2label) != {str(i) for i in range(len(id2label))}:
        first = ", ".join(repr(k)[:20] for k in list(id2label)[:3])
        raise CheckpointError(
            f"id2label keys must be the class indices 0 to {len(id2label) - 1}, got {first}, ..."
        )
    return [id2label[str(i)] for i in range(len(id2label))]


def hf_files(directory: Path) -> tuple[Path, Path]:
    """config.json and the weights file of a Hugging Face model directory."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)")
    weights = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        sharded = (directory / "model.safetensors.index.json").is_file()
        why = (
            " (weights split into shards are not read: merge them into one file)" if sharded else ""
        )
        raise CheckpointError(f"{directory}: no {' or '.join(WEIGHT_FILES)}{why}")
    return config_path, weights


def from_hf(directory: str | Path) -> ViT:
    """A vitkit model from a Hugging Face ViT directory."""
    directory = Path(directory)
    config_path, weights = hf_files(directory)
    with reading(directory):
        state = read_state_dict(weights)
        prefix = "vit." if any(k.startswith("vit.") for k in state) else ""
        head = state.get("classifier.weight")
        with reading(config_path):
            config, labels = config_from_hf(read_json(config_path), head is not None)
        if head is not None and config.num_classes != head.shape[0]:
            config = config.replace(num_classes=head.shape[0])
            labels = None
        with reading(directory / PREPROCESSOR_FILE):
            config = config.replace(**preprocessing(directory, config.in_channels))
        extra = HF_HEAD if head is not None else {}
        ours = rename(state, HF_VIT, prefix, config.depth, config.qkv_bias, extra)
        model = build(ours, config, weights)
    model.labels = labels
    return model


def rename(
    state: dict[str, torch.Tensor],
    layout: HFLayout,
    prefix: str,
    depth: int,
    qkv_bias: bool = True,
    extra: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """vitkit's tensors (float32) from a state dict laid out as `layout` under `prefix`;
    `extra`: more Hugging Face -> vitkit names, outside the prefix (a head). A tensor left
    over belongs to something vitkit does not build, and is refused by name."""
    table = {prefix + hf: ours for hf, ours in layout.top.items()} | (extra or {})
    fused: dict[str, list[str]] = {}
    for i in range(depth):
        block = prefix + layout.blocks.format(i=i)
        table |= {block + hf: f"blocks.{i}.{ours}" for hf, ours in layout.block.items()}
        for part in ("weight", "bias") if qkv_bias else ("weight",):
            fused[f"blocks.{i}.attn.qkv.{part}"] = [f"{block}{q}.{part}" for q in layout.qkv]
    used = set(table) | {name for names in fused.values() for name in names}
    missing = sorted(used - set(state))
    if missing:
        raise CheckpointError(f"Hugging Face checkpoint lacks {', '.join(missing[:8])}")
    unused = tuple(prefix + name for name in layout.unused)
    leftover = sorted(k for k in set(state) - used if not k.startswith(unused))
    if leftover:
        raise CheckpointError(
            f"Hugging Face checkpoint has tensors vitkit does not use: {', '.join(leftover[:8])}"
        )
    out = {ours: state[hf].float() for hf, ours in table.items()}
    # Misshapen parts fail to stack (a RuntimeError, which the caller's `reading` names).
    return out | {
        ours: torch.cat([state[n].float() for n in names]) for ours, names in fused.items()
    }


def build(state: dict[str, torch.Tensor], config: ViTConfig, weights: Path) -> ViT:
    """The model `config` describes with `state`, once every tensor's name and shape fit."""
    problems = shape_problems({k: v.shape for k, v in state.items()}, state_shapes(config))
    if problems:
        raise CheckpointError(f"{weights} does not match config.json: " + " | ".join(problems))
    model = ViT(config)
    model.load_state_dict(state)
    return model.eval()


def preprocessing(
    directory: Path, channels: int, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Normalisation, resampling and eval crop from preprocessor_config.json. What it does not
    say is taken from `defaults` (a family's usual processor), else from what
    `ViTImageProcessor` defaults to (0.5 / 0.5, no crop; the resize is the config's)."""
    path = directory / PREPROCESSOR_FILE
    pre = read_json(path) if path.is_file() else {}
    if not isinstance(pre, dict):
        raise CheckpointError(f"must be a JSON object, got {type(pre).__name__}")
    out: dict[str, Any] = {"mean": (0.5,) * channels, "std": (0.5,) * channels}
    out |= defaults or {}
    if "image_mean" in pre and "image_std" in pre:
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
            value = pre[theirs]  # a list, or one number for every channel
            out[ours] = tuple(value) if isinstance(value, list) else (value,) * channels
    resample = pre.get("resample")
    if isinstance(resample, int) and resample in PIL_RESAMPLE.values():
        out["interpolation"] = {v: k for k, v in PIL_RESAMPLE.items()}[resample]
    if path.is_file():  # a processor that does not crop keeps the whole centre square
        crop_pct = _crop_pct(pre)
        out["crop_pct"] = 1.0 if crop_pct is None else crop_pct
    return out


def _crop_pct(pre: dict[str, Any]) -> float | None:
    """The share of the resized image an image processor's centre crop keeps: its `crop_pct`
    (which ViTConfig checks), or its crop size over its (square or shortest-edge) resize; None
    where it does not crop, or crops more than it resized (padding)."""
    if not pre.get("do_center_crop", "crop_pct" in pre):
        return None
    if "crop_pct" in pre:
        # ConvNeXT's processor resizes without cropping from 384 pixels up.
        kind = str(pre.get("image_processor_type") or pre.get("feature_extractor_type"))
        if kind.startswith("ConvNext") and (_side(pre.get("size")) or 0) >= 384:
            return None
        return pre["crop_pct"]
    size, crop = _side(pre.get("size")), _side(pre.get("crop_size"))
    return crop / size if size and crop and crop <= size else None


def _side(size: Any) -> int | None:
    """The side of a processor's `size` or `crop_size`: a number, a square, or shortest_edge."""
    if isinstance(size, dict):
        height, width = size.get("height"), size.get("width")
        size = size.get("shortest_edge", height if height == width else None)
    is_int = isinstance(size, int) and not isinstance(size, bool)
    return size if is_int and size > 0 else None


def to_hf(model: ViT, directory: str | Path) -> Path:
    """Write a directory that `ViTForImageClassification.from_pretrained` loads."""
    c = model.config
    plain = c.class_token and c.pool == "cls" and c.cls_pos_embed and c.resnet_layers is None
    extras = c.distilled or c.layer_scale_init is not None or c.norm_pre or c.act != "gelu"
    if not plain or c.num_registers or c.fc_norm or extras or c.mlp != "mlp":
        raise CheckpointError(
            "Hugging Face's ViT is a plain ViT with a [CLS]-pooled head: this model (mean "
            "pooling, registers, fc_norm, a hybrid CNN, a distillation token, layer scale, a "
            "norm before the encoder, a SwiGLU MLP or another activation than GELU) cannot be "
            "exported to it"
        )
    directory = Path(directory)
    ours = model.state_dict()
    state = {"vit." + hf: ours[v] for hf, v in HF_TOP.items()}
    for i in range(c.depth):
        block = f"vit.encoder.layer.{i}."
        state |= {block + hf: ours[f"blocks.{i}.{v}"] for hf, v in HF_BLOCK.items()}
        for part in ("weight", "bias"):
            for q, chunk in zip(HF_QKV, ours[f"blocks.{i}.attn.qkv.{part}"].chunk(3), strict=True):
                state[f"{block}{q}.{part}"] = chunk
    if c.num_classes:
        state |= {hf: ours[v] for hf, v in HF_HEAD.items()}
    labels = model.labels or [f"LABEL_{i}" for i in range(c.num_classes)]
    hf_config = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": c.width,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.heads,
        "intermediate_size": c.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": c.ln_eps,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "num_channels": c.in_channels,
        "qkv_bias": c.qkv_bias,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(directory / "model.safetensors", save_safetensors(tensors, {"format": "pt"}))
    atomic_write(directory / "config.json", json.dumps(hf_config, indent=2) + "\n")
    preprocessor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": c.image_size, "width": c.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "resample": PIL_RESAMPLE[c.interpolation],
        "do_normalize": True,
        "image_mean": list(c.mean),
        "image_std": list(c.std),
    }
    atomic_write(directory / PREPROCESSOR_FILE, json.dumps(preprocessor, indent=2) + "\n")
    return directory
