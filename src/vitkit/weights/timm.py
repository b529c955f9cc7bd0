"""timm's VisionTransformer checkpoints <-> vitkit.

vitkit's module names follow timm's, so the name table is the identity; what takes work is
reading the architecture back from the tensors alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vitkit.config import ViTConfig, brief, is_instance, resnet_stride
from vitkit.model.vit import ViT, state_shapes
from vitkit.weights.foreign import default_heads, grid_of, read_state_dict
from vitkit.weights.format import CheckpointError, read_json, reading, shape_problems

# timm names that vitkit has too (per block, {i} is the block index). Anything else in a
# checkpoint (layer scale, q/k norms, attention pooling...) is an architecture vitkit does
# not build, and is refused by name.
TIMM_NAMES = (
    "cls_token",
    "reg_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "blocks.{i}.norm1.weight",
    "blocks.{i}.norm1.bias",
    "blocks.{i}.attn.qkv.weight",
    "blocks.{i}.attn.qkv.bias",
    "blocks.{i}.attn.proj.weight",
    "blocks.{i}.attn.proj.bias",
    "blocks.{i}.norm2.weight",
    "blocks.{i}.norm2.bias",
    "blocks.{i}.mlp.fc1.weight",
    "blocks.{i}.mlp.fc1.bias",
    "blocks.{i}.mlp.fc2.weight",
    "blocks.{i}.mlp.fc2.bias",
    "norm.weight",
    "norm.bias",
    # The hybrid's ResNet-v2 ({s}: stage, {i}: block, {n}: 1 to 3).
    "patch_embed.backbone.stem.conv.weight",
    "patch_embed.backbone.stem.norm.weight",
    "patch_embed.backbone.stem.norm.bias",
    "patch_embed.backbone.stages.{s}.blocks.{i}.conv{n}.weight",
    "patch_embed.backbone.stages.{s}.blocks.{i}.norm{n}.weight",
    "patch_embed.backbone.stages.{s}.blocks.{i}.norm{n}.bias",
    "patch_embed.backbone.stages.{s}.blocks.{i}.downsample.conv.weight",
    "patch_embed.backbone.stages.{s}.blocks.{i}.downsample.norm.weight",
    "patch_embed.backbone.stages.{s}.blocks.{i}.downsample.norm.bias",
    "fc_norm.weight",
    "fc_norm.bias",
    "head.weight",
    "head.bias",
)
_PATTERN = re.compile("|".join(re.sub(r"\\\{[isn]\\\}", r"\\d+", re.escape(n)) for n in TIMM_NAMES))
# What timm's eval transform takes when a pretrained_cfg names no crop_pct.
TIMM_DEFAULT_CROP_PCT = 0.875


def config_from_timm(state: dict[str, torch.Tensor], heads: int | None = None) -> ViTConfig:
    """The ViTConfig that `state` (a timm ViT state dict) was made by."""
    unknown = sorted(k for k in state if not _PATTERN.fullmatch(k))
    if unknown:
        raise CheckpointError(f"not a plain timm ViT: unsupported tensors {', '.join(unknown[:8])}")
    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    if not all(k in state for k in needed):
        raise CheckpointError(f"not a timm ViT: it needs {', '.join(needed)}")
    width, cnn_channels, patch, _ = state["patch_embed.proj.weight"].shape
    resnet = resnet_from_timm(state)
    channels = resnet["in_channels"] if resnet else cnn_channels
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    class_token = "cls_token" in state
    registers = state["reg_token"].shape[1] if "reg_token" in state else 0
    positions = state["pos_embed"].shape[1]
    # Position embeddings cover the patches, plus [CLS] unless the model says otherwise.
    if class_token and grid_of(positions - 1):
        grid, cls_pos = grid_of(positions - 1), True
    elif grid_of(positions):
        grid, cls_pos = grid_of(positions), False
    else:
        raise CheckpointError(f"pos_embed of {positions} positions is not a square grid")
    fc_norm = "fc_norm.weight" in state
    stride = patch * resnet_stride(resnet.get("resnet_layers"), resnet.get("resnet_stem", ""))
    return ViTConfig(
        image_size=grid * stride,
        patch_size=patch,
        in_channels=channels,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        width=width,
        depth=depth,
        heads=heads or default_heads(width),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        pool="mean" if fc_norm or not class_token else "cls",
        fc_norm=fc_norm,
        class_token=class_token,
        num_registers=registers,
        cls_pos_embed=cls_pos,
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        interpolation="bicubic",  # the default_cfg of timm's ViTs
        **{k: v for k, v in resnet.items() if k != "in_channels"},
    )


def resnet_from_timm(state: dict[str, torch.Tensor]) -> dict:
    """The hybrid's ResNet-v2 settings (empty for a plain ViT), from its tensors' shapes."""
    stem = state.get("patch_embed.backbone.stem.conv.weight")
    if stem is None:
        return {}
    blocks = re.compile(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.conv1\.weight")
    per_stage: dict[int, int] = {}
    for k in state:
        if m := blocks.fullmatch(k):
            per_stage[int(m[1])] = per_stage.get(int(m[1]), 0) + 1
    return {
        "in_channels": stem.shape[1],
        "resnet_layers": tuple(per_stage[s] for s in sorted(per_stage)),
        "resnet_width": stem.shape[0],
        "resnet_stem": "imagenet" if stem.shape[-1] == 7 else "small",
    }


def from_timm(
    path_or_state: str | Path | dict[str, torch.Tensor] | torch.nn.Module,
    heads: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> ViT:
    """A vitkit model with a timm checkpoint's weights and architecture: a weights file, a
    state dict or a timm model.

    The eval crop (`crop_pct`) is timm's `pretrained_cfg`'s: a timm model's own, or for a
    file, that of the timm `config.json` beside it (as a Hub repository holds them); 1.0
    without one.
    """
    if isinstance(path_or_state, torch.nn.Module):
        pretrained = getattr(path_or_state, "pretrained_cfg", None)
        crop_pct = crop_pct_from_timm(pretrained) if isinstance(pretrained, dict) else None
        return _build(path_or_state.state_dict(), heads, mean, std, crop_pct)
    if isinstance(path_or_state, dict):
        return _build(path_or_state, heads, mean, std)
    path = Path(path_or_state)
    crop_pct = _hub_crop_pct(path.parent / "config.json")
    with reading(path):
        return _build(read_state_dict(path), heads, mean, std, crop_pct)


def crop_pct_from_timm(pretrained_cfg: dict[str, Any]) -> float:
    """The eval crop of timm's `pretrained_cfg`: its crop_pct (timm's default where it has
    none), or 1.0 where it crops other than from the centre ("squash", "border")."""
    if (pretrained_cfg.get("crop_mode") or "center") != "center":
        return 1.0
    crop_pct = pretrained_cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT
    if not is_instance(crop_pct, float) or not 0 < crop_pct <= 1:
        raise CheckpointError(
            f"pretrained_cfg crop_pct must be a number in (0, 1], got {brief(crop_pct)}"
        )
    return crop_pct


def _hub_crop_pct(path: Path) -> float | None:
    """The eval crop of the timm Hub `config.json` at `path`, or None where there is none."""
    if not path.is_file():
        return None
    with reading(path):
        data = read_json(path)
        pretrained = data.get("pretrained_cfg") if isinstance(data, dict) else None
        return crop_pct_from_timm(pretrained) if isinstance(pretrained, dict) else None


def _build(
    state: dict[str, torch.Tensor],
    heads: int | None,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    crop_pct: float | None = None,
) -> ViT:
    config = config_from_timm(state, heads)
    if mean is not None and std is not None:
        config = config.replace(mean=tuple(mean), std=tuple(std))
    if crop_pct is not None:
        config = config.replace(crop_pct=crop_pct)
    # The config is read off a few tensors: every other one must fit it before it is built.
    problems = shape_problems({k: v.shape for k, v in state.items()}, state_shapes(config))
    if problems:
        raise CheckpointError("timm checkpoint does not fit one ViT: " + " | ".join(problems))
    model = ViT(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def to_timm(model: ViT) -> dict[str, torch.Tensor]:
    """A state dict that timm's VisionTransformer of the same shape loads as it is."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
