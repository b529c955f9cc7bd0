"""Hugging Face DINOv2, CLIP and SigLIP image towers -> vitkit.

`from_hf_auto` reads a Hugging Face directory by its config.json's model_type:

- vit: `ViTModel`, `ViTForImageClassification` (hf.py);
- dinov2, dinov2_with_registers: `Dinov2Model`, `Dinov2WithRegistersModel` (and their
  `Backbone`s, which hold the same tensors): features, no head; the giant's SwiGLU MLP
  (use_swiglu_ffn) too;
- clip_vision_model, clip: `CLIPVisionModel` (features), `CLIPVisionModelWithProjection`
  and the image tower of a `CLIPModel`, whose `visual_projection` becomes the head;
- siglip_vision_model, siglip: `SiglipVisionModel` and the image tower of a `SiglipModel`:
  features pooled by SigLIP's attention head (vitkit's pool="map").

What vitkit cannot build is refused by name: the classification heads of
`Dinov2ForImageClassification` ([CLS] concatenated with the mean of the patch tokens),
`CLIPForImageClassification` (the mean of unnormalised patch tokens), SigLIP towers without
their attention head, and SigLIP 2.

At the native size vitkit's outputs are transformers' (tests/test_families_hf.py). At other
sizes the position embeddings are resampled by vitkit's rule (bicubic, antialiased):
`Dinov2WithRegistersModel` resamples the same way, while `Dinov2Model` and CLIP (with
interpolate_pos_encoding) resample without antialiasing, which weighs neighbours a little
differently (PyTorch's antialiased bicubic kernel is Pillow's, a = -0.5, the plain one
a = -0.75); Meta's own DINOv2 code also scales by (grid + 0.1) / grid. Tokens then differ
slightly from transformers' at those sizes.

DINOv2's processors feed 224-pixel crops (shorter side 256) to models whose config.json says
518 (the position-embedding grid): vitkit keeps the 518 and the processor's 224 / 256 crop
share, so it predicts on 518-pixel crops; `set_image_size(224)` gives transformers' input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitkit.config import MAX_PARAMS, ViTConfig, brief
from vitkit.model.vit import ViT
from vitkit.weights.foreign import read_state_dict
from vitkit.weights.format import (
    CheckpointError,
    check_float,
    read_header,
    read_json,
    read_tensors,
    reading,
)
from vitkit.weights.hf import (
    HF_QKV,
    PREPROCESSOR_FILE,
    HFLayout,
    activation_from_hf,
    build,
    from_hf,
    hf_files,
    layer_norm_eps,
    mlp_ratio,
    positive_int,
    preprocessing,
    rename,
)
from vitkit.weights.timm import DEFAULT_LAYER_SCALE_INIT

# -- DINOv2 -------------------------------------------------------------------------------
DINOV2_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",  # [CLS] has one, registers none
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Within block i: "encoder.layer.{i}.<hf>" -> "blocks.{i}.<vitkit>".
DINOV2_BLOCK = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
# The mask token stands in for masked patches in pretraining (iBOT); inference never uses it.
DINOV2 = HFLayout(
    DINOV2_TOP, "encoder.layer.{i}.", DINOV2_BLOCK, HF_QKV, unused=("embeddings.mask_token",)
)
# Registers sit after [CLS], without position embeddings: vitkit's order and rule.
# [CLS]'s own position embedding is folded into the token (see `from_hf_dinov2`).
DINOV2_REGISTERS = HFLayout(
    DINOV2_TOP | {"embeddings.register_tokens": "reg_token"},
    DINOV2.blocks,
    DINOV2_BLOCK,
    HF_QKV,
    unused=DINOV2.unused,
)
# The SwiGLU MLP (use_swiglu_ffn, the giant's): weights_in packs the gate's rows, then the
# value's, as vitkit's fc1 does. (transformers 5 splits it into gate_proj and up_proj in
# memory and joins them again on saving, so its files keep Meta's names.)
DINOV2_SWIGLU_BLOCK = {k: v for k, v in DINOV2_BLOCK.items() if not k.startswith("mlp.")} | {
    "mlp.weights_in.weight": "mlp.fc1.weight",
    "mlp.weights_in.bias": "mlp.fc1.bias",
    "mlp.weights_out.weight": "mlp.fc2.weight",
    "mlp.weights_out.bias": "mlp.fc2.bias",
}
# Without a preprocessor_config.json: facebook/dinov2-*'s BitImageProcessor (shorter side to
# 256, bicubic, centre 224, ImageNet statistics).
DINOV2_PREPROCESSING = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bicubic",
    "crop_pct": 224 / 256,
}

# -- CLIP ---------------------------------------------------------------------------------
CLIP_TOP = {
    "embeddings.class_embedding": "cls_token",
    "embeddings.position_embedding.weight": "pos_embed",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",  # no bias, as norm_pre's
    "pre_layrnorm.weight": "norm_pre.weight",  # (sic)
    "pre_layrnorm.bias": "norm_pre.bias",
    # CLIP normalises the pooled [CLS] only; a LayerNorm acts on each token alone, so
    # normalising every token and then taking [CLS] (vitkit's `norm`, as timm's CLIP) is the
    # same pooled vector, and keeps the config the same as a timm CLIP's.
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}
CLIP_BLOCK = {
    "layer_norm1.weight": "norm1.weight",
    "layer_norm1.bias": "norm1.bias",
    "self_attn.out_proj.weight": "attn.proj.weight",
    "self_attn.out_proj.bias": "attn.proj.bias",
    "layer_norm2.weight": "norm2.weight",
    "layer_norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
CLIP = HFLayout(
    CLIP_TOP,
    "encoder.layers.{i}.",
    CLIP_BLOCK,
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)
# The projection into the joint image-text space, a Linear without bias; vitkit's head.
CLIP_PROJECTION = {"visual_projection.weight": "head.weight"}
# CLIP keeps [CLS] as a (D,) vector and its position embeddings as an nn.Embedding's (T, D)
# table; vitkit's have leading batch (and token) dimensions. vitkit name -> CLIP's rank.
CLIP_RANKS = {"cls_token": 1, "pos_embed": 2}
# Without a preprocessor_config.json: OpenAI's CLIPImageProcessor (shorter side to 224,
# bicubic, centre 224).
CLIP_PREPROCESSING = {
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
    "crop_pct": 1.0,
}

# -- SigLIP -------------------------------------------------------------------------------
# The blocks are named as CLIP's; no [CLS], no LayerNorm before the blocks, and the attention
# head (`head.*`) reads every token after `post_layernorm`, as vitkit's `attn_pool` does.
SIGLIP_TOP = {
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "embeddings.position_embedding.weight": "pos_embed",  # patches only
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "head.probe": "attn_pool.latent",
    "head.attention.out_proj.weight": "attn_pool.proj.weight",
    "head.attention.out_proj.bias": "attn_pool.proj.bias",
    "head.layernorm.weight": "attn_pool.norm.weight",
    "head.layernorm.bias": "attn_pool.norm.bias",
    "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
    "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
    "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
    "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
}
# nn.MultiheadAttention packs q, k and v into in_proj_{weight,bias} (3D rows, in that order);
# they are split into vitkit's `q` (the first D rows) and `kv` (the rest) after renaming.
SIGLIP_IN_PROJ = "head.attention.in_proj_"
SIGLIP = HFLayout(SIGLIP_TOP, CLIP.blocks, CLIP_BLOCK, CLIP.qkv, unused=(SIGLIP_IN_PROJ,))
# Without a preprocessor_config.json: SiglipImageProcessor (the whole image resized to the
# model's size, bicubic, mean = std = 0.5).
SIGLIP_PREPROCESSING = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bicubic",
    "crop_pct": 1.0,
}

# -- what is refused ----------------------------------------------------------------------
SIGLIP2 = (
    "SigLIP 2 embeds flattened patches with a linear layer and resizes its position "
    "embeddings per image (NaFlex), which vitkit does not build"
)
REFUSED_TYPES = {"siglip2": SIGLIP2, "siglip2_vision_model": SIGLIP2}


def from_hf_auto(directory: str | Path) -> ViT:
    """A vitkit model from a Hugging Face directory of any family vitkit reads."""
    directory = Path(directory)
    config_path, _ = hf_files(directory)
    with reading(config_path):
        kind = model_type(read_json(config_path))
    return READERS[kind](directory)


def model_type(hf: Any) -> str:
    """config.json's model_type, refused by name unless vitkit reads it."""
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    if kind in READERS:
        return kind
    if kind in REFUSED_TYPES:
        raise CheckpointError(f"model_type {kind}: {REFUSED_TYPES[kind]}")
    raise CheckpointError(
        f"model_type {brief(kind)} is not one vitkit reads ({', '.join(READERS)})"
    )


# -- DINOv2 -------------------------------------------------------------------------------
def from_hf_dinov2(directory: str | Path) -> ViT:
    """A vitkit feature extractor from a Hugging Face DINOv2 directory (with or without
    registers). A classification head is refused: see the module's docstring."""
    directory = Path(directory)
    config_path, weights = hf_files(directory)
    with reading(directory):
        with reading(config_path):
            config, registers = config_from_dinov2(read_json(config_path))
        state = read_state_dict(weights)
        if any(k.startswith("classifier.") for k in state):
            raise CheckpointError(
                f"{weights}: Dinov2ForImageClassification's head reads [CLS] concatenated with "
                "the mean of the patch tokens, a pooling vitkit does not build (it pools one "
                "or the other)"
            )
        # A classifier's backbone lies under its base model's name.
        base = "dinov2_with_registers." if registers else "dinov2."
        prefix = base if any(k.startswith(base) for k in state) else ""
        defaults = DINOV2_PREPROCESSING if config.in_channels == 3 else None
        with reading(directory / PREPROCESSOR_FILE):
            config = config.replace(**preprocessing(directory, config.in_channels, defaults))
        layout = DINOV2_REGISTERS if registers else DINOV2
        if config.mlp == "swiglu":
            layout = dataclasses.replace(layout, block=DINOV2_SWIGLU_BLOCK)
        ours = rename(state, layout, prefix, config.depth, config.qkv_bias)
        if registers and ours["pos_embed"].ndim == 3:  # another rank: the shape check names it
            # As timm (and vitkit's DINOv2 reg4 preset) lay register models out: [CLS]'s
            # position embedding added to the token once. The same sum at every image size,
            # since vitkit never resamples a prefix token's position.
            ours["cls_token"] = ours["cls_token"] + ours["pos_embed"][:, :1]
            ours["pos_embed"] = ours["pos_embed"][:, 1:]
        return build(ours, config, weights)


def config_from_dinov2(hf: Any) -> tuple[ViTConfig, bool]:
    """A ViTConfig from a Dinov2Config or Dinov2WithRegistersConfig (as a dict), and whether
    it has registers. Absent fields take transformers' defaults."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"a config must be a JSON object, got {type(hf).__name__}")
    registers = hf.get("model_type") == "dinov2_with_registers"
    swiglu = hf.get("use_swiglu_ffn", False)
    if not isinstance(swiglu, bool):
        raise CheckpointError(f"use_swiglu_ffn must be true or false, got {brief(swiglu)}")
    patch = positive_int(hf, "patch_size", 16 if registers else 14)
    ratio = hf.get("mlp_ratio", 4)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
        raise CheckpointError(f"mlp_ratio must be a number, got {brief(ratio)}")
    config = ViTConfig(
        # transformers' grid is image_size // patch_size too.
        image_size=positive_int(hf, "image_size", 224) // patch * patch,
        patch_size=patch,
        in_channels=positive_int(hf, "num_channels", 3),
        num_classes=0,
        width=positive_int(hf, "hidden_size", 768),
        depth=positive_int(hf, "num_hidden_layers", 12),
        heads=positive_int(hf, "num_attention_heads", 12),
        mlp_ratio=ratio,  # a plain MLP: both take int(width * mlp_ratio) units
        qkv_bias=hf.get("qkv_bias", True),
        ln_eps=layer_norm_eps(hf, 1e-6),
        # transformers' SwiGLU ignores hidden_act (SiLU always), and so does vitkit.
        act="gelu" if swiglu else activation_from_hf(hf, "gelu"),
        # Where the gains started, which only training from scratch reads: DINOv2's 1e-5, as
        # timm's reader and vitkit's presets say. (config.json's layerscale_value is
        # transformers' class default, 1.0, in Meta's own checkpoints.)
        layer_scale_init=DEFAULT_LAYER_SCALE_INIT,
        num_registers=positive_int(hf, "num_register_tokens", 4) if registers else 0,
        cls_pos_embed=not registers,
    )
    if swiglu:  # the sizes are checked: the plain MLP's units are int(width * mlp_ratio)
        # Dinov2SwiGLUFFN (Meta's SwiGLUFFNFused) keeps two thirds of them, rounded up to a
        # multiple of 8 (the giant: 6144 -> 4096).
        hidden = (int(config.mlp_dim * 2 / 3) + 7) // 8 * 8
        config = config.replace(mlp="swiglu", mlp_ratio=mlp_ratio(config.width, hidden))
    return config, registers


# -- CLIP ---------------------------------------------------------------------------------
def from_hf_clip(directory: str | Path) -> ViT:
    """A vitkit model from a Hugging Face CLIP directory: `CLIPVisionModel` (features, the
    normalised [CLS]), or with `visual_projection` (`CLIPVisionModelWithProjection`, a whole
    `CLIPModel`, whose text tower is not read) a head without bias that gives the image
    embedding (`get_image_features`, before CLIP's L2 normalisation).

    vitkit's heads have a bias; the projection's is zero. Fine-tuning trains it like any head.
    """
    directory = Path(directory)
    config_path, weights = hf_files(directory)
    with reading(directory):
        with reading(config_path):
            config = config_from_clip(read_json(config_path))
        state = read_some(weights, _is_image_tower)
        if any(k.startswith("classifier.") for k in state):
            raise CheckpointError(
                f"{weights}: CLIPForImageClassification's head reads the mean of the patch "
                "tokens without CLIP's final LayerNorm, which vitkit's ViT always applies"
            )
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
        projection = state.get("visual_projection.weight")
        if projection is not None:
            if projection.ndim != 2:
                raise CheckpointError(
                    f"{weights}: visual_projection.weight is {tuple(projection.shape)}, not "
                    "(projection_dim, hidden_size)"
                )
            config = config.replace(num_classes=projection.shape[0])
        defaults = CLIP_PREPROCESSING if config.in_channels == 3 else None
        with reading(directory / PREPROCESSOR_FILE):
            config = config.replace(**preprocessing(directory, config.in_channels, defaults))
        extra = CLIP_PROJECTION if projection is not None else {}
        ours = rename(state, CLIP, prefix, config.depth, extra=extra)
        for name, rank in CLIP_RANKS.items():
            if ours[name].ndim == rank:  # another rank: the shape check names it
                ours[name] = ours[name].reshape((1,) * (3 - rank) + ours[name].shape)
        if projection is not None:
            ours["head.bias"] = torch.zeros(config.num_classes)
        return build(ours, config, weights)


def config_from_clip(hf: Any) -> ViTConfig:
    """A ViTConfig from a CLIPVisionConfig, or a CLIPConfig's vision_config (as dicts).
    Absent fields take transformers' defaults (OpenAI's ViT-B/32)."""
    hf = _vision_config(hf, "clip")
    return _tower_config(hf, 32, 1e-5, "quick_gelu", norm_pre=True)


def _vision_config(hf: Any, whole: str) -> dict[str, Any]:
    """The image tower's config: `hf` itself, or the vision_config of a `whole` model's."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"a config must be a JSON object, got {type(hf).__name__}")
    if hf.get("model_type") == whole:
        hf = hf.get("vision_config") or {}
        if not isinstance(hf, dict):
            raise CheckpointError(f"vision_config must be a JSON object, got {brief(hf)}")
    return hf


def _tower_config(
    hf: dict[str, Any], patch: int, eps: float, act: str, **options: Any
) -> ViTConfig:
    """A headless image tower's ViTConfig from a CLIP-style vision config; absent fields take
    transformers' defaults (`patch`, `eps` and `act` differ by family)."""
    width, patch = positive_int(hf, "hidden_size", 768), positive_int(hf, "patch_size", patch)
    return ViTConfig(
        image_size=positive_int(hf, "image_size", 224) // patch * patch,
        patch_size=patch,
        in_channels=positive_int(hf, "num_channels", 3),
        num_classes=0,
        width=width,
        depth=positive_int(hf, "num_hidden_layers", 12),
        heads=positive_int(hf, "num_attention_heads", 12),
        mlp_ratio=mlp_ratio(width, positive_int(hf, "intermediate_size", 3072)),
        ln_eps=layer_norm_eps(hf, eps),
        act=activation_from_hf(hf, act),
        **options,
    )


def _is_image_tower(name: str) -> bool:
    """A CLIPModel's or SiglipModel's tensors vitkit reads: the image tower and its projection
    (not the text tower, nor the logit scale and bias)."""
    return not name.startswith(("text_model.", "text_projection.", "logit_scale", "logit_bias"))


# -- SigLIP -------------------------------------------------------------------------------
def from_hf_siglip(directory: str | Path) -> ViT:
    """A vitkit feature extractor from a Hugging Face SigLIP directory: `SiglipVisionModel`
    or a whole `SiglipModel` (its text tower is not read). The features are transformers'
    pooler_output, the attention head's; the tokens, its last_hidden_state."""
    directory = Path(directory)
    config_path, weights = hf_files(directory)
    with reading(directory):
        with reading(config_path):
            config = config_from_siglip(read_json(config_path))
        state = read_some(weights, _is_image_tower)
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
        defaults = SIGLIP_PREPROCESSING if config.in_channels == 3 else None
        with reading(directory / PREPROCESSOR_FILE):
            config = config.replace(**preprocessing(directory, config.in_channels, defaults))
        ours = rename(state, SIGLIP, prefix, config.depth)
        for part in ("weight", "bias"):
            packed = state.get(f"{prefix}{SIGLIP_IN_PROJ}{part}")
            if packed is None:
                raise CheckpointError(f"{weights} lacks {prefix}{SIGLIP_IN_PROJ}{part}")
            # Misshapen rows are left to the shape check, which names them.
            ours[f"attn_pool.q.{part}"] = packed[: config.width].float()
            ours[f"attn_pool.kv.{part}"] = packed[config.width :].float()
        if ours["pos_embed"].ndim == 2:  # an nn.Embedding's (T, D) table; another rank: named
            ours["pos_embed"] = ours["pos_embed"][None]
        return build(ours, config, weights)


def config_from_siglip(hf: Any) -> ViTConfig:
    """A ViTConfig from a SiglipVisionConfig, or a SiglipConfig's vision_config (as dicts).
    Absent fields take transformers' defaults (SigLIP B/16 at 224 pixels)."""
    hf = _vision_config(hf, "siglip")
    if hf.get("vision_use_head", True) is not True:
        raise CheckpointError("vision_use_head false: a SigLIP tower without its pooling head")
    options = {"pool": "map", "class_token": False, "cls_pos_embed": False}
    return _tower_config(hf, 16, 1e-6, "gelu_pytorch_tanh", **options)


def read_some(weights: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file whose names `keep` accepts; of a safetensors file, only
    those are read, and integer `position_ids` buffers (which older transformers saved: the
    positions 0, 1, ..., implicit in vitkit) are left out. A PyTorch file is read whole, and
    its reader refuses such buffers."""
    if weights.suffix != ".safetensors":
        return {k: v for k, v in read_state_dict(weights).items() if keep(k)}
    header = {
        name: info
        for name, info in read_header(weights).items()
        if keep(name) and not (name.endswith(".position_ids") and info.dtype.startswith("I"))
    }
    check_float(weights, header)
    total = sum(math.prod(info.shape) for info in header.values())
    if total > MAX_PARAMS:
        raise CheckpointError(
            f"{weights}: {total:,} numbers, more than the {MAX_PARAMS:,} parameters vitkit builds"
        )
    return read_tensors(weights, header)


READERS: dict[str, Callable[[str | Path], ViT]] = {
    "vit": from_hf,
    "dinov2": from_hf_dinov2,
    "dinov2_with_registers": from_hf_dinov2,
    "clip": from_hf_clip,
    "clip_vision_model": from_hf_clip,
    "siglip": from_hf_siglip,
    "siglip_vision_model": from_hf_siglip,
}
