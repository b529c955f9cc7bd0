"""timm's VisionTransformer checkpoints <-> vitkit.

vitkit's module names follow timm's, so the name table is the identity; what takes work is
reading the architecture back. The tensors fix most of it (a SwiGLU MLP too: its fc1 gives
twice fc2's inputs); the few settings they leave open (head count, LayerNorm eps, activation,
preprocessing) come from a timm model's own modules, the timm `config.json` beside a weights
file, or the architecture's name (`TIMM_FAMILIES`).

Pretraining checkpoints also hold what only pretraining uses: MAE's decoder (`decoder_*`) and
a mask token (MAE's, DINOv2's). vitkit's ViT is the encoder those checkpoints pretrain, which
is what fine-tuning and feature extraction start from, so these tensors are dropped
(`PRETRAINING_ONLY`), as timm does; everything else must be a tensor vitkit builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.config import ViTConfig, brief, is_instance, resnet_stride
from vitkit.model.vit import ViT, state_shapes
from vitkit.weights.foreign import default_heads, grid_of, read_state_dict
from vitkit.weights.format import CheckpointError, read_json, reading, shape_problems
from vitkit.weights.hf import mlp_ratio

# timm names that vitkit has too (per block, {i} is the block index); anything else in a
# checkpoint is an architecture vitkit does not build, and is refused by name.
TIMM_NAMES = (
    "cls_token",
    "dist_token",  # DeiT's distillation token
    "reg_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm_pre.weight",  # CLIP's LayerNorm before the blocks
    "norm_pre.bias",
    "blocks.{i}.norm1.weight",
    "blocks.{i}.norm1.bias",
    "blocks.{i}.attn.qkv.weight",
    "blocks.{i}.attn.qkv.bias",
    "blocks.{i}.attn.proj.weight",
    "blocks.{i}.attn.proj.bias",
    "blocks.{i}.ls1.gamma",  # layer scale (DeiT-III, DINOv2)
    "blocks.{i}.norm2.weight",
    "blocks.{i}.norm2.bias",
    "blocks.{i}.mlp.fc1.weight",  # a SwiGLU's gate and value rows, packed (SwiGLUPacked)
    "blocks.{i}.mlp.fc1.bias",
    "blocks.{i}.mlp.fc2.weight",
    "blocks.{i}.mlp.fc2.bias",
    "blocks.{i}.ls2.gamma",
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
    # The attention-pooling head (SigLIP's MAP).
    "attn_pool.latent",
    "attn_pool.q.weight",
    "attn_pool.q.bias",
    "attn_pool.kv.weight",
    "attn_pool.kv.bias",
    "attn_pool.proj.weight",
    "attn_pool.proj.bias",
    "attn_pool.norm.weight",
    "attn_pool.norm.bias",
    "attn_pool.mlp.fc1.weight",
    "attn_pool.mlp.fc1.bias",
    "attn_pool.mlp.fc2.weight",
    "attn_pool.mlp.fc2.bias",
    "fc_norm.weight",
    "fc_norm.bias",
    "head.weight",
    "head.bias",
    "head_dist.weight",  # the distillation token's head
    "head_dist.bias",
)
_PATTERN = re.compile("|".join(re.sub(r"\\\{[isn]\\\}", r"\\d+", re.escape(n)) for n in TIMM_NAMES))
# Tensors of architectures vitkit does not build, and what they belong to (for the refusal).
UNSUPPORTED_TENSORS = (
    (r"\.attn\.[qk]_norm\.", "q/k normalisation (qk_norm)"),
    (
        r"^attn_pool\.(?:pos_embed|[qk]_norm)",
        "an attention pool with position embeddings or qk_norm",
    ),
    (
        r"\.mlp\.(?:fc1_[gx]|w12|w3)\.",
        "a SwiGLU MLP laid out otherwise than timm's SwiGLUPacked (fc1_g and fc1_x; Meta's "
        "w12 and w3: load those through timm or Hugging Face)",
    ),
    (
        r"\.attn\.[qv]_bias$",
        "q and v biases apart from qkv (BEiT, EVA; EVA-02 also rotates positions)",
    ),
    (r"\.attn\.relative_position", "relative position biases (BEiT)"),
    (r"\.gamma_[12]$", "BEiT's layer scale (gamma_1, gamma_2)"),
    (r"\.(?:attn|mlp)\.norm\.", "a norm inside attention or the MLP"),
)
# MAE's decoder (Meta's pretraining checkpoints with it, e.g. mae_visualize_*.pth) and the
# mask tokens of MAE and DINOv2 (iBOT): read and dropped, see the module's docstring. Their
# names fully match, so an encoder tensor can never be taken for one.
PRETRAINING_ONLY = re.compile(
    r"decoder_(?:embed|pos_embed|norm|pred)(?:\.\w+)?|decoder_blocks\.\d+\..+|mask_token"
)
# What timm's eval transform takes when a pretrained_cfg names no crop_pct.
TIMM_DEFAULT_CROP_PCT = 0.875
# Weights with layer scale do not say which value the gains started from; only training from
# scratch would use it. DINOv2's.
DEFAULT_LAYER_SCALE_INIT = 1e-5


@dataclass(frozen=True)
class TimmFamily:
    """What a timm architecture's weights leave open, from its registry name: head counts by
    size, LayerNorm eps, the layer-scale init, the activation the weights were trained with."""

    pattern: str  # matches the name without its ".tag"; the group "size" keys `heads`
    heads: dict[str, int] = field(default_factory=dict)
    ln_eps: float = 1e-6
    layer_scale_init: float | None = None
    act: str | None = None  # None: the default (or the name's "_quickgelu_")


TIMM_FAMILIES = (
    TimmFamily(
        r"deit_(?P<size>[a-z]+)_(?:distilled_)?patch16_\d+", {"tiny": 3, "small": 6, "base": 12}
    ),
    TimmFamily(
        r"deit3_(?P<size>[a-z]+)_patch\d+_\d+",
        {"small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16},
        layer_scale_init=1e-6,
    ),
    # The giant's MLP is a SwiGLU, which the tensors show.
    TimmFamily(
        r"vit_(?P<size>[a-z]+)_patch14_(?:reg4_)?dinov2",
        {"small": 6, "base": 12, "large": 16, "giant": 24},
        layer_scale_init=1e-5,
    ),
    TimmFamily(
        r"vit_(?P<size>[a-z]+)_patch\d+_clip_(?:quickgelu_)?\d+",
        {"xsmall": 4, "medium": 8, "betwixt": 10, "base": 12, "large": 16, "huge": 16}
        | {"giant": 16, "gigantic": 16},  # 1408 and 1664 wide: not 64-wide heads
        ln_eps=1e-5,
    ),
    # SigLIP: attention pooling, no [CLS]. big_vision trained it with GELU's tanh form (as
    # Hugging Face runs it); timm's models use exact GELU, which `act="gelu"` reproduces.
    TimmFamily(
        r"vit_(?P<size>[a-z0-9]+)_patch\d+_siglip_(?:gap_)?\d+",
        {"base": 12, "large": 16, "so400m": 16, "giantopt": 16},
        act="gelu_tanh",
    ),
)
# timm's model classes and layers that vitkit builds (GluMlp: as SwiGLUPacked makes it), and
# its activations by class name (nn.GELU's tanh form is read off the module).
TIMM_CLASSES = ("VisionTransformer", "VisionTransformerDistilled")
TIMM_LAYERS = {"block": ("Block",), "attention": ("Attention",), "MLP": ("Mlp", "GluMlp")}
TIMM_ACTIVATIONS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}
TIMM_POOLS = {"token": "cls", "avg": "mean", "map": "map"}


def config_from_timm(state: dict[str, torch.Tensor], **settings: Any) -> ViTConfig:
    """The ViTConfig that `state` (a timm ViT state dict) was made by.

    `settings` are ViTConfig fields the tensors leave open (heads, ln_eps, act, pool,
    layer_scale_init, preprocessing), as a timm model or its config.json state them.
    """
    state = drop_pretraining(state)
    unknown = sorted(k for k in state if not _PATTERN.fullmatch(k))
    if unknown:
        refuse_tensors(unknown)
    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    if not all(k in state for k in needed):
        raise CheckpointError(f"not a timm ViT: it needs {', '.join(needed)}")
    width, cnn_channels, patch, _ = state["patch_embed.proj.weight"].shape
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    fc2 = state.get("blocks.0.mlp.fc2.weight")
    # A SwiGLU's fc1 gives twice fc2's inputs (a gate and a value), a plain MLP's as many;
    # other shapes are left to the shape check, which names them.
    swiglu = fc2 is not None and fc2.ndim == 2 and hidden == 2 * fc2.shape[1]
    if swiglu:
        hidden //= 2
        settings.pop("act", None)  # its SiLU is fixed; `act` names a plain MLP's
    resnet = resnet_from_timm(state)
    channels = resnet["in_channels"] if resnet else cnn_channels
    class_token = "cls_token" in state
    distilled = "dist_token" in state
    registers = state["reg_token"].shape[1] if "reg_token" in state else 0
    grid, cls_pos = pos_grid(state["pos_embed"].shape[1], int(class_token) + distilled, registers)
    fc_norm = "fc_norm.weight" in state
    stride = patch * resnet_stride(resnet.get("resnet_layers"), resnet.get("resnet_stem", ""))
    # The tensors decide whether there are gains; a setting only says where they started.
    layer_scale = settings.pop("layer_scale_init", None) or DEFAULT_LAYER_SCALE_INIT
    # timm keeps the RGB statistics in the pretrained_cfg of a model built for other inputs.
    for key in ("mean", "std"):
        if len(settings.get(key, ())) != channels:
            settings.pop(key, None)
    fixed = dict(
        image_size=grid * stride,
        patch_size=patch,
        in_channels=channels,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        width=width,
        depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        mlp_ratio=mlp_ratio(width, hidden),
        mlp="swiglu" if swiglu else "mlp",
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        fc_norm=fc_norm,
        class_token=class_token,
        distilled=distilled,
        num_registers=registers,
        cls_pos_embed=cls_pos,
        layer_scale_init=layer_scale if "blocks.0.ls1.gamma" in state else None,
        norm_pre="norm_pre.weight" in state,
        **{k: v for k, v in resnet.items() if k != "in_channels"},
    )
    pool = "map" if "attn_pool.latent" in state else "mean" if fc_norm or not class_token else "cls"
    defaults = dict(
        heads=default_heads(width),
        pool=pool,
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        interpolation="bicubic",  # the default_cfg of timm's ViTs
    )
    return ViTConfig(**fixed, **(defaults | settings))


def pos_grid(positions: int, positioned: int, registers: int) -> tuple[int, bool]:
    """(grid side, whether [CLS] and the distillation token have position embeddings) from
    the number of position embeddings; `positioned`: how many of those tokens there are."""
    if positioned and grid_of(positions - positioned):
        return grid_of(positions - positioned), True
    if grid_of(positions):
        return grid_of(positions), False
    if registers and grid_of(positions - positioned - registers):
        raise CheckpointError(
            "not a timm ViT vitkit builds: position embeddings for register tokens (timm's "
            "reg_tokens without no_embed_class)"
        )
    raise CheckpointError(f"pos_embed of {positions} positions is not a square grid")


def drop_pretraining(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the tensors only pretraining uses (`PRETRAINING_ONLY`)."""
    return {k: v for k, v in state.items() if not PRETRAINING_ONLY.fullmatch(k)}


def refuse_tensors(unknown: list[str]) -> None:
    """A CheckpointError naming the architecture `unknown` tensors belong to, where known."""
    what = [
        label
        for pattern, label in UNSUPPORTED_TENSORS
        if any(re.search(pattern, k) for k in unknown)
    ]
    named = "; ".join(what) + ": " if what else ""
    raise CheckpointError(
        f"not a timm ViT vitkit builds: {named}unsupported tensors {', '.join(unknown[:8])}"
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


# -- the settings tensors leave open --------------------------------------------------------
def family_settings(architecture: str) -> dict[str, Any]:
    """What a timm architecture's registry name says (`TIMM_FAMILIES`; "_quickgelu_" in the
    name: QuickGELU); empty for other names."""
    name = architecture.split(".")[0]
    settings: dict[str, Any] = {"act": "quick_gelu"} if "_quickgelu_" in name else {}
    for family in TIMM_FAMILIES:
        if m := re.fullmatch(family.pattern, name):
            settings["ln_eps"] = family.ln_eps
            if m["size"] in family.heads:
                settings["heads"] = family.heads[m["size"]]
            if family.layer_scale_init is not None:
                settings["layer_scale_init"] = family.layer_scale_init
            if family.act is not None:
                settings["act"] = family.act
            break
    return settings


def module_settings(model: nn.Module) -> dict[str, Any]:
    """What a timm model says beyond its tensors: its blocks' head count, LayerNorm eps,
    activation and layer-scale init, its pooling, and its pretrained_cfg. Models and layers
    vitkit does not build are refused by name."""
    kind = type(model).__name__
    if kind not in TIMM_CLASSES:
        raise CheckpointError(
            f"timm's {kind} is not a ViT vitkit builds (it converts {', '.join(TIMM_CLASSES)})"
        )
    settings = pool_setting(getattr(model, "global_pool", "token"))
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None and type(attn_pool).__name__ != "AttentionPoolLatent":
        raise CheckpointError(f"timm's {type(attn_pool).__name__} pool is not one vitkit builds")
    if len(model.blocks):
        block = model.blocks[0]
        layers = {"block": block, "attention": block.attn, "MLP": block.mlp}
        for what, layer in layers.items():
            if type(layer).__name__ not in (expected := TIMM_LAYERS[what]):
                raise CheckpointError(
                    f"timm's {type(layer).__name__} {what} is not one vitkit builds "
                    f"({', '.join(expected)})"
                )
        if not isinstance(block.norm1, nn.LayerNorm):
            raise CheckpointError(f"timm's {type(block.norm1).__name__} is not a LayerNorm")
        settings |= {"heads": block.attn.num_heads, "ln_eps": block.norm1.eps}
        if type(block.mlp).__name__ == "GluMlp":
            check_swiglu(block.mlp)  # no act: a SwiGLU's is SiLU
        else:
            settings["act"] = activation_name(block.mlp.act)
        if hasattr(block.ls1, "init_values"):
            settings["layer_scale_init"] = float(block.ls1.init_values)
    pretrained = getattr(model, "pretrained_cfg", None)
    return settings | (pretrained_settings(pretrained) if isinstance(pretrained, dict) else {})


def activation_name(act: nn.Module) -> str:
    """vitkit's `act` for a timm MLP's activation module."""
    name = TIMM_ACTIVATIONS.get(type(act).__name__)
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        name = "gelu_tanh"
    if name is None:
        raise CheckpointError(f"timm's {type(act).__name__} activation is not one vitkit builds")
    return name


def check_swiglu(mlp: nn.Module) -> None:
    """Refuse a timm GluMlp other than SwiGLUPacked's (SiLU on the first half of fc1's
    outputs, linear layers, no norm): its tensors would load, but compute something else."""
    act = type(mlp.act).__name__
    packed = act == "SiLU" and not mlp.gate_last and isinstance(mlp.fc1, nn.Linear)
    if not packed or not isinstance(mlp.norm, nn.Identity):
        gate = "last" if mlp.gate_last else "first"
        raise CheckpointError(
            f"timm's GluMlp with {act}, gate {gate}, {type(mlp.fc1).__name__} layers and "
            f"{type(mlp.norm).__name__} norm is not the SwiGLU vitkit builds (SwiGLUPacked: "
            "SiLU, gate first, Linear layers, no norm)"
        )


def pool_setting(global_pool: Any) -> dict[str, Any]:
    """vitkit's pooling for timm's `global_pool` ("": none, a headless model's tokens)."""
    if isinstance(global_pool, str) and global_pool in TIMM_POOLS:
        return {"pool": TIMM_POOLS[global_pool]}
    if global_pool:
        raise CheckpointError(
            f"timm's global_pool {brief(global_pool)} is not one vitkit builds ([CLS], mean, map)"
        )
    return {}


def pretrained_settings(pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing a timm `pretrained_cfg` names (eval crop, mean, std, resize), and
    QuickGELU where timm notes that the weights are "natively QuickGELU" (OpenAI's and other
    CLIP towers, which timm runs with GELU under their plain names)."""
    settings: dict[str, Any] = {"crop_pct": crop_pct_from_timm(pretrained_cfg)}
    for key in ("mean", "std"):
        value = pretrained_cfg.get(key)
        if value is None:
            continue
        value = tuple(value) if isinstance(value, list) else value
        if not value or not is_instance(value, tuple[float, ...]):
            raise CheckpointError(f"pretrained_cfg {key} must be numbers, got {brief(value)}")
        settings[key] = value
    interpolation = pretrained_cfg.get("interpolation")
    if interpolation is not None:
        if interpolation not in ("bilinear", "bicubic"):
            raise CheckpointError(
                "pretrained_cfg interpolation must be bilinear or bicubic, got "
                + brief(interpolation)
            )
        settings["interpolation"] = interpolation
    notes = pretrained_cfg.get("notes")
    if isinstance(notes, list | tuple) and any("natively QuickGELU" in str(n) for n in notes):
        settings["act"] = "quick_gelu"
    return settings


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


def hub_settings(path: Path) -> dict[str, Any]:
    """What the timm `config.json` at `path` says (empty where there is none): its
    architecture's name, its pooling, the head count in its model_args, and its
    pretrained_cfg."""
    if not path.is_file():
        return {}
    with reading(path):
        data = read_json(path)
        if not isinstance(data, dict):
            return {}
        architecture, args = data.get("architecture"), data.get("model_args")
        settings = family_settings(architecture) if isinstance(architecture, str) else {}
        settings |= pool_setting(data.get("global_pool"))
        heads = args.get("num_heads") if isinstance(args, dict) else None
        if heads is not None:
            if not is_instance(heads, int) or heads < 1:
                raise CheckpointError(f"model_args num_heads must be positive, got {brief(heads)}")
            settings["heads"] = heads
        pretrained = data.get("pretrained_cfg")
        return settings | (pretrained_settings(pretrained) if isinstance(pretrained, dict) else {})


# -- conversion -------------------------------------------------------------------------------
def from_timm(
    path_or_state: str | Path | dict[str, torch.Tensor] | nn.Module, **overrides: Any
) -> ViT:
    """A vitkit model with a timm checkpoint's weights and architecture: a weights file, a
    state dict or a timm model.

    The tensors fix the architecture but for a few settings, each taken from the last of:
    vitkit's defaults (heads by width, LayerNorm eps 1e-6, GELU, mean = std = 0.5, crop 1.0);
    for a file, the timm `config.json` beside it (as a Hub repository holds it), its
    architecture's name and model_args; for a timm model, its own layers; then the
    pretrained_cfg of either (preprocessing; QuickGELU where timm notes the weights are
    "natively QuickGELU"); then `overrides`, ViTConfig fields (`heads=16`, `act="gelu"` for
    timm's own numbers on such weights). None values are ignored.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(path_or_state, nn.Module):
        return _build(path_or_state.state_dict(), module_settings(path_or_state), overrides)
    if isinstance(path_or_state, dict):
        return _build(path_or_state, {}, overrides)
    path = Path(path_or_state)
    settings = hub_settings(path.parent / "config.json")
    with reading(path):
        return _build(read_state_dict(path), settings, overrides)


def _build(
    state: dict[str, torch.Tensor], settings: dict[str, Any], overrides: dict[str, Any]
) -> ViT:
    state = drop_pretraining(state)
    config = config_from_timm(state, **settings)
    if overrides:
        config = config.replace(**overrides)
    # The config is read off a few tensors: every other one must fit it before it is built.
    problems = shape_problems({k: v.shape for k, v in state.items()}, state_shapes(config))
    if problems:
        raise CheckpointError("timm checkpoint does not fit one ViT: " + " | ".join(problems))
    model = ViT(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def to_timm(model: ViT) -> dict[str, torch.Tensor]:
    """A state dict that timm's VisionTransformer (VisionTransformerDistilled for a distilled
    model) of the same shape loads as it is."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
