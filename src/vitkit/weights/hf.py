"""Hugging Face `transformers` ViT directories <-> vitkit.

Reads `ViTModel` and `ViTForImageClassification` checkpoints (config.json + model.safetensors
or pytorch_model.bin) and writes directories that `ViTForImageClassification.from_pretrained`
loads. Tensor names are those of the files on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from vitkit.config import ViTConfig
from vitkit.model.vit import ViT
from vitkit.weights.foreign import read_state_dict
from vitkit.weights.format import CheckpointError, atomic_write

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
# vitkit's fused qkv projection is Hugging Face's query, key and value, stacked in that order.
HF_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
HF_HEAD = {"classifier.weight": "head.weight", "classifier.bias": "head.bias"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# preprocessor_config.json names resampling filters by their Pillow numbers.
PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}


def config_from_hf(hf: dict[str, Any], has_head: bool) -> tuple[ViTConfig, list[str] | None]:
    """A ViTConfig (and labels) from a Hugging Face ViT config.json."""
    if hf.get("model_type") != "vit":
        raise CheckpointError(
            f"not a Hugging Face ViT config (model_type {hf.get('model_type')!r})"
        )
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported (only gelu)")
    id2label = {int(k): v for k, v in (hf.get("id2label") or {}).items()}
    labels = [id2label[i] for i in sorted(id2label)] if has_head and id2label else None
    width, channels = hf.get("hidden_size", 768), hf.get("num_channels", 3)
    config = ViTConfig(
        image_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 16),
        in_channels=channels,
        num_classes=len(labels) if labels else 0,
        width=width,
        depth=hf.get("num_hidden_layers", 12),
        heads=hf.get("num_attention_heads", 12),
        mlp_ratio=hf.get("intermediate_size", 4 * width) / width,
        qkv_bias=hf.get("qkv_bias", True),
        ln_eps=float(hf.get("layer_norm_eps", 1e-12)),
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        interpolation="bilinear",
    )
    return config, labels


def from_hf(directory: str | Path) -> ViT:
    """A vitkit model from a Hugging Face ViT directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)")
    weights = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{directory}: no {' or '.join(WEIGHT_FILES)}")
    state = read_state_dict(weights)
    prefix = "vit." if any(k.startswith("vit.") for k in state) else ""
    has_head = "classifier.weight" in state
    config, labels = config_from_hf(json.loads(config_path.read_text()), has_head)
    if has_head and config.num_classes != state["classifier.weight"].shape[0]:
        config = config.replace(num_classes=state["classifier.weight"].shape[0])
        labels = None
    config = config.replace(**_preprocessing(directory, config.in_channels))
    model = ViT(config)
    model.load_state_dict(_to_vitkit(state, prefix, config.depth, has_head))
    model.labels = labels
    return model.eval()


def _to_vitkit(
    state: dict[str, torch.Tensor], prefix: str, depth: int, has_head: bool
) -> dict[str, torch.Tensor]:
    out, used = {}, set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise CheckpointError(f"Hugging Face checkpoint lacks {name}")
        used.add(name)
        return state[name].float()

    for hf_name, ours in HF_TOP.items():
        out[ours] = take(prefix + hf_name)
    for i in range(depth):
        block = f"{prefix}encoder.layer.{i}."
        for hf_name, ours in HF_BLOCK.items():
            out[f"blocks.{i}.{ours}"] = take(block + hf_name)
        for part in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(
                [take(f"{block}{q}.{part}") for q in HF_QKV]
            )
    if has_head:
        out |= {ours: take(hf_name) for hf_name, ours in HF_HEAD.items()}
    leftover = sorted(k for k in set(state) - used if not k.startswith("pooler."))
    if leftover:
        raise CheckpointError(
            f"Hugging Face checkpoint has tensors vitkit does not use: {', '.join(leftover[:8])}"
        )
    return out


def _preprocessing(directory: Path, channels: int) -> dict[str, Any]:
    """Normalisation and resampling from preprocessor_config.json; without one, what
    `ViTImageProcessor` defaults to (0.5 / 0.5, bilinear)."""
    path = directory / "preprocessor_config.json"
    pre = json.loads(path.read_text()) if path.is_file() else {}
    out: dict[str, Any] = {"mean": (0.5,) * channels, "std": (0.5,) * channels}
    if "image_mean" in pre and "image_std" in pre:
        out["mean"], out["std"] = tuple(pre["image_mean"]), tuple(pre["image_std"])
    resample = {v: k for k, v in PIL_RESAMPLE.items()}.get(pre.get("resample"))
    if resample:
        out["interpolation"] = resample
    return out


def to_hf(model: ViT, directory: str | Path) -> Path:
    """Write a directory that `ViTForImageClassification.from_pretrained` loads."""
    c = model.config
    plain = c.class_token and c.pool == "cls" and c.cls_pos_embed and c.resnet_layers is None
    if not plain or c.num_registers or c.fc_norm:
        raise CheckpointError(
            "Hugging Face's ViT is a plain ViT with a [CLS]-pooled head: this model "
            "(mean pooling, registers, fc_norm or a hybrid CNN) cannot be exported to it"
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
    atomic_write(directory / "preprocessor_config.json", json.dumps(preprocessor, indent=2) + "\n")
    return directory
