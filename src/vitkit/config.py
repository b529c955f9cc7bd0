"""ViT configuration: one dataclass, named presets, strict JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes a ViT's architecture, plus the preprocessing its weights expect."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    ln_eps: float = 1e-6
    # How the tokens become one feature: [CLS], the mean of the patch tokens, or attention
    # pooling (SigLIP's MAP head: a learnt probe attends over the patch tokens, then an MLP).
    pool: Literal["cls", "mean", "map"] = "cls"
    # timm's average-pooled models normalise after pooling ("fc_norm") instead of before.
    fc_norm: bool = False
    class_token: bool = True
    # DeiT's distillation token: a second prefix token after [CLS], read by a head of its own
    # (`head_dist`); the two heads' logits are averaged.
    distilled: bool = False
    # Registers (Darcet et al., 2024; DINOv2 reg4): prefix tokens that no head reads, spare
    # room for the global information ViTs otherwise store in background patches.
    num_registers: int = 0
    # The paper gives [CLS] (DeiT: the distillation token too) a position embedding of its
    # own; DeiT-III and register models (timm's no_embed_class) add position embeddings to
    # patch tokens only. Registers never have one.
    cls_pos_embed: bool = True
    # Per-channel gains on both residual branches, starting at this value (CaiT, DeiT-III,
    # DINOv2): a deep block starts close to the identity. None: no gains.
    layer_scale_init: float | None = None
    # A LayerNorm on the tokens before the first block (CLIP's ln_pre); as in CLIP, the patch
    # projection then has no bias.
    norm_pre: bool = False
    # The MLP's nonlinearity: exact GELU (the paper), its tanh approximation, or OpenAI CLIP's
    # QuickGELU, x * sigmoid(1.702 x).
    act: Literal["gelu", "gelu_tanh", "quick_gelu"] = "gelu"
    # The MLP: the paper's, fc2(act(fc1(x))), or SwiGLU (Shazeer, 2020; DINOv2's giant),
    # fc2(silu(gate) * value), with the gate's and the value's rows packed in fc1 (gate first,
    # as timm's SwiGLUPacked and DINOv2's weights_in). mlp_ratio counts the units fc2 reads
    # (mlp_dim), so a SwiGLU fc1 has twice as many outputs. Its nonlinearity is SiLU: `act`
    # speaks of the paper's MLP only and stays "gelu", so that one model has one config.
    mlp: Literal["mlp", "swiglu"] = "mlp"
    # Preprocessing travels with the weights, so prediction normalises as training did.
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # How images are resized to image_size: timm's ViTs were trained with bicubic, Google's
    # and Hugging Face's with bilinear.
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    # The share of the centre square that evaluation and prediction keep (timm's crop_pct):
    # the shorter side is resized to image_size / crop_pct, then image_size is cut from the
    # centre. 1.0 keeps the whole centre square; most of timm's 224-pixel ViTs take 0.9.
    crop_pct: float = 1.0
    # The hybrid model (paper, section 3.1): patches are cut from a ResNet-v2 feature map
    # instead of the image. Bottleneck blocks per stage (None: no CNN, a plain ViT), the
    # stem's width, and its kind: "imagenet" (7x7/2 conv + max-pool) or "small" (3x3/1 conv).
    resnet_layers: tuple[int, ...] | None = None
    resnet_width: int = 64
    resnet_stem: Literal["imagenet", "small"] = "imagenet"
    # Provenance, not architecture: the Hub checkpoint the weights were downloaded from, or
    # after fine-tuning started from, pinned to a commit ("hf:org/name@<sha>"). Equal configs
    # may come from different places, so comparisons ignore it.
    source: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_floats(self)
        positive = ("image_size", "patch_size", "in_channels", "width", "depth", "heads")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"ViTConfig.{name} must be positive, got {brief(getattr(self, name))}"
                )
        if self.num_classes < 0 or self.num_registers < 0:
            raise ValueError("ViTConfig.num_classes and num_registers must be >= 0")
        for name, limit in SIZE_LIMITS.items():
            if getattr(self, name) > limit:
                raise ValueError(
                    f"ViTConfig.{name} must be at most {limit:,}, got {brief(getattr(self, name))}"
                )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.mlp_dim < 1:
            raise ValueError(f"ViTConfig.mlp_ratio {self.mlp_ratio} leaves the MLP no units")
        if self.resnet_layers is not None:
            if not self.resnet_layers or min(self.resnet_layers) < 1:
                raise ValueError("resnet_layers needs at least one stage of at least one block")
            stages, most = len(self.resnet_layers), max(self.resnet_layers)
            if stages > MAX_RESNET_STAGES or most > MAX_RESNET_BLOCKS:
                raise ValueError(
                    f"ViTConfig.resnet_layers must have at most {MAX_RESNET_STAGES} stages of at "
                    f"most {MAX_RESNET_BLOCKS} blocks, got {brief(list(self.resnet_layers))}"
                )
            if self.resnet_width <= 0 or self.resnet_width % 32:
                raise ValueError("resnet_width must be a positive multiple of 32 (GroupNorm)")
        if self.image_size % self.token_stride:
            what = f"patch_size {self.patch_size}"
            if self.resnet_layers is not None:
                stride = f"CNN stride {self.cnn_stride} x {what}"
                what = f"the token stride {self.token_stride} ({stride})"
            raise ValueError(f"image_size {self.image_size} is not a multiple of {what}")
        if self.pool not in ("cls", "mean", "map"):
            raise ValueError(f"pool must be 'cls', 'mean' or 'map', got {brief(self.pool)}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError(
                "pool='cls' needs class_token=True; use pool='mean' or 'map' without one"
            )
        if self.mlp == "swiglu" and self.act != "gelu":
            raise ValueError(
                f"ViTConfig.act {brief(self.act)} is the plain MLP's nonlinearity; a SwiGLU "
                "MLP's is SiLU: leave act at 'gelu'"
            )
        if self.mlp == "swiglu" and self.pool == "map":
            # timm's attention pool keeps a plain MLP whatever its blocks have; no published
            # model pairs the two, so vitkit does not guess which one it would be.
            raise ValueError("mlp='swiglu' with pool='map' is not a model vitkit builds")
        if self.distilled and self.pool != "cls":
            raise ValueError(
                "distilled=True reads [CLS] and the distillation token: it needs pool='cls'"
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean and std need one value per input channel ({self.in_channels})")
        if any(s <= 0 for s in self.std):
            raise ValueError("ViTConfig.std values must be positive")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ViTConfig.{name} must be in [0, 1)")
        if self.source is not None and (len(self.source) > 1000 or not self.source.isprintable()):
            raise ValueError(
                "ViTConfig.source must be one printable line of at most 1000 characters"
            )

    # -- derived sizes ---------------------------------------------------------
    @property
    def cnn_stride(self) -> int:
        """How much the hybrid's CNN shrinks the image (1 without one)."""
        return resnet_stride(self.resnet_layers, self.resnet_stem)

    @property
    def cnn_channels(self) -> int:
        """Channels of the map the patches are cut from: the image's, or the CNN's output."""
        if self.resnet_layers is None:
            return self.in_channels
        return 4 * self.resnet_width * 2 ** (len(self.resnet_layers) - 1)

    @property
    def token_stride(self) -> int:
        """Image pixels per token side: the patch size, times the CNN's stride."""
        return self.patch_size * self.cnn_stride

    @property
    def grid_size(self) -> int:
        return self.image_size // self.token_stride

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: [CLS], the distillation token, registers."""
        return int(self.class_token) + int(self.distilled) + self.num_registers

    @property
    def num_pos_embeds(self) -> int:
        positioned = int(self.class_token) + int(self.distilled) if self.cls_pos_embed else 0
        return self.num_patches + positioned

    @property
    def mlp_dim(self) -> int:
        """The MLP's hidden units: fc1's outputs, or a SwiGLU's gate (and value) units."""
        return int(self.width * self.mlp_ratio)

    # -- construction and serialisation -----------------------------------------
    def replace(self, **overrides: Any) -> ViTConfig:
        """A copy with some fields changed; grey/colour inputs get matching mean/std lengths."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s): {', '.join(sorted(unknown))}")
        for key in _TUPLE_FIELDS:  # JSON and TOML give lists
            if isinstance(overrides.get(key), list):
                overrides[key] = tuple(overrides[key])
        channels = overrides.get("in_channels", self.in_channels)
        if channels != self.in_channels:
            overrides.setdefault("mean", _resize_stat(self.mean, channels))
            overrides.setdefault("std", _resize_stat(self.std, channels))
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.resnet_layers is not None:
            d["resnet_layers"] = list(self.resnet_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        """Strict: unknown fields and wrong types are errors, not silently dropped."""
        if not isinstance(d, dict):
            raise ValueError(f"a ViT config must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in _TUPLE_FIELDS:
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> ViTConfig:
        return cls.from_json(Path(path).read_text())


_TUPLE_FIELDS = ("mean", "std", "resnet_layers")


@dataclass(frozen=True)
class TextConfig:
    """CLIP's text Transformer (Radford et al., 2021): token and position embeddings, causal
    pre-norm blocks, a final LayerNorm, the end-of-text token's features projected into the
    space shared with the image tower. Defaults: OpenAI's ViT-B/16 text tower."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    # The joint image-text space: the image tower's head has as many outputs.
    embed_dim: int = 512
    act: Literal["gelu", "gelu_tanh", "quick_gelu"] = "quick_gelu"
    ln_eps: float = 1e-5
    # The token whose features stand for the text: the first end-of-text token (CLIP's
    # tokenizer gives it the largest id, which is why OpenAI's code takes the argmax).
    eot_id: int = 49407
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("mlp_ratio", "ln_eps", "dropout", "attn_dropout"):
            if not _finite(getattr(self, name)):
                raise ValueError(f"TextConfig.{name} must be finite")
        for name, limit in TEXT_LIMITS.items():
            value = getattr(self, name)
            if not 0 < value <= limit:
                raise ValueError(f"TextConfig.{name} must be in 1..{limit:,}, got {brief(value)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0 <= self.eot_id < self.vocab_size:
            raise ValueError(f"eot_id {self.eot_id} is not in a vocabulary of {self.vocab_size}")
        if not 0 < self.mlp_ratio <= MAX_MLP_RATIO or self.mlp_dim < 1:
            raise ValueError(f"TextConfig.mlp_ratio must be in (0, {MAX_MLP_RATIO}]")
        if not 0 < self.ln_eps <= 1:
            raise ValueError(f"TextConfig.ln_eps must be in (0, 1], got {brief(self.ln_eps)}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TextConfig.{name} must be in [0, 1)")

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def layer_scale_init(self) -> None:
        """The blocks' residual gains: none in CLIP's text tower."""
        return None

    def replace(self, **overrides: Any) -> TextConfig:
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> TextConfig:
        """Strict, as `ViTConfig.from_dict`."""
        if not isinstance(d, dict):
            raise ValueError(f"a text config must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TextConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**d)


# -- limits ------------------------------------------------------------------------
# A config.json may come from anyone, so every size is bounded before a model is built: far
# above any published ViT (ViT-22B: width 6144, depth 48, 48 heads; ImageNet-21k: 21,843
# classes), low enough that a hostile file cannot ask for terabytes of memory.
SIZE_LIMITS = {
    "image_size": 8192,
    "patch_size": 1024,
    "in_channels": 1024,
    "num_classes": 1_000_000,
    "width": 16384,
    "depth": 1024,
    "heads": 1024,
    "num_registers": 1024,
    "resnet_width": 4096,
}
MAX_RESNET_STAGES = 8
MAX_RESNET_BLOCKS = 256  # per stage; ResNet-152's largest stage has 36
MAX_MLP_RATIO = 64.0
# A text tower's sizes (the largest CLIPs: vocabularies of 250,000 tokens, 1280 wide, 36 deep).
TEXT_LIMITS = {
    "vocab_size": 1_000_000,
    "context_length": 8192,
    "width": 16384,
    "depth": 1024,
    "heads": 1024,
    "embed_dim": 16384,
}
# ViT-e (3.9 billion) fits; 4 billion float32 parameters take 16 GB.
MAX_PARAMS = 4_000_000_000


def _check_floats(cfg: ViTConfig) -> None:
    """NaN and infinity parse from JSON; none of them, nor a float-overflowing int, is a
    setting. Ranges that the fields' meaning fixes are checked here too."""
    floats = ("mlp_ratio", "ln_eps", "dropout", "attn_dropout", "drop_path", "crop_pct")
    for name in (*floats, "mean", "std", "layer_scale_init"):
        value = getattr(cfg, name)
        if value is None:  # layer_scale_init: no gains
            continue
        if not all(_finite(v) for v in (value if isinstance(value, tuple) else (value,))):
            raise ValueError(f"ViTConfig.{name} must be finite, got {brief(value)}")
    if not 0 < cfg.mlp_ratio <= MAX_MLP_RATIO:
        raise ValueError(
            f"ViTConfig.mlp_ratio must be in (0, {MAX_MLP_RATIO}], got {brief(cfg.mlp_ratio)}"
        )
    if not 0 < cfg.ln_eps <= 1:
        raise ValueError(f"ViTConfig.ln_eps must be in (0, 1], got {brief(cfg.ln_eps)}")
    if not 0 < cfg.crop_pct <= 1:
        raise ValueError(f"ViTConfig.crop_pct must be in (0, 1], got {brief(cfg.crop_pct)}")
    if cfg.layer_scale_init is not None and not 0 < cfg.layer_scale_init <= 1:
        raise ValueError(
            "ViTConfig.layer_scale_init must be None or in (0, 1], "
            f"got {brief(cfg.layer_scale_init)}"
        )


def brief(value: Any) -> str:
    """`value` for an error message, cut short: a hostile file's values can be megabytes."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def resnet_stride(layers: tuple[int, ...] | None, stem: str) -> int:
    """How much a hybrid's ResNet shrinks the image: 4 for the ImageNet stem, then 2 for each
    stage after the first (1 without a ResNet)."""
    if layers is None:
        return 1
    return (4 if stem == "imagenet" else 1) * 2 ** (len(layers) - 1)


def _resize_stat(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(set(values)) == 1:
        return (values[0],) * channels
    return (sum(values) / len(values),) * channels


def _check_types(cfg: ViTConfig | TextConfig) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if not is_instance(value, hint):
            raise ValueError(
                f"{type(cfg).__name__}.{f.name} must be {type_name(hint)}, got {brief(value)} "
                f"({type(value).__name__})"
            )


def is_instance(value: Any, hint: Any) -> bool:
    """Whether `value` (as JSON or TOML gives it) is of the annotated type `hint`."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        return isinstance(value, tuple) and all(is_instance(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(is_instance(value, h) for h in typing.get_args(hint))
    if hint is float:  # JSON writes 1.0 as 1; accept ints for floats, never bools
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)  # dict[str, Any]: any dict


def type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# -- presets -----------------------------------------------------------------------
# The paper's variants (width, depth, heads), named big_vision style: "S/16" = small, patch 16.
_VARIANTS: dict[str, tuple[int, int, int]] = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}


def _paper(variant: str, patch: int) -> ViTConfig:
    width, depth, heads = _VARIANTS[variant]
    return ViTConfig(image_size=224, patch_size=patch, width=width, depth=depth, heads=heads)


_GREY = {"in_channels": 1, "mean": (0.5,), "std": (0.5,), "num_classes": 10}

PRESETS: dict[str, ViTConfig] = {
    "Ti/16": _paper("Ti", 16),
    "S/16": _paper("S", 16),
    "B/16": _paper("B", 16),
    "B/32": _paper("B", 32),
    "L/16": _paper("L", 16),
    "H/14": _paper("H", 14),
    # The paper's hybrid: ResNet-50 with stage 4 removed and its blocks moved to stage 3
    # (3, 4, 9), stride 16, its map cut into 1x1 "patches".
    "R50+B/16": _paper("B", 1).replace(resnet_layers=(3, 4, 9)),
    "R50+B/16@384": _paper("B", 1).replace(resnet_layers=(3, 4, 9), image_size=384),
    # Small images (MNIST-like 28x28 grey, CIFAR-like 32x32 colour): small patches, narrow
    # and shallow encoders, some regularisation by default; the suffix is the image size.
    "Ti/7@28": ViTConfig(
        image_size=28, patch_size=7, width=192, depth=6, heads=3, drop_path=0.05, **_GREY
    ),
    "Ti/4@28": ViTConfig(
        image_size=28, patch_size=4, width=192, depth=6, heads=3, drop_path=0.05, **_GREY
    ),
    "Ti/4@32": ViTConfig(
        image_size=32, patch_size=4, width=192, depth=6, heads=3, drop_path=0.1, num_classes=10
    ),
}
# Small hybrids: the ImageNet-style stem (stride 4) and one stage of two bottlenecks make a
# 256-channel map of 7x7 (28 px) or 8x8 (32 px) cells, each cell a token ("/4": 4 px apart).
_SMALL_RESNET = {"resnet_layers": (2,), "resnet_width": 64, "patch_size": 1}
PRESETS["R+Ti/4@28"] = PRESETS["Ti/4@28"].replace(**_SMALL_RESNET)
PRESETS["R+Ti/4@32"] = PRESETS["Ti/4@32"].replace(**_SMALL_RESNET)

# The ViTs people start from, each as timm builds it (the same parameter count, see
# tests/test_families.py) with the normalisation its weights expect; `from_timm` brings the
# weights and their evaluation crop.
_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_OPENAI_CLIP = {
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
}
_DINOV2 = {"image_size": 518, "num_classes": 0, "layer_scale_init": 1e-5, **_IMAGENET}
PRESETS |= {
    # DeiT (Touvron et al., 2021): the paper's ViT, trained on ImageNet-1k alone; the
    # distilled one also learns from a CNN teacher through a token of its own.
    "DeiT-S/16": _paper("S", 16).replace(**_IMAGENET),
    "DeiT-B/16-distilled": _paper("B", 16).replace(distilled=True, **_IMAGENET),
    # DeiT III (Touvron et al., 2022): layer scale, position embeddings for patches only.
    "DeiT3-S/16": _paper("S", 16).replace(layer_scale_init=1e-6, cls_pos_embed=False, **_IMAGENET),
    # DINOv2 (Oquab et al., 2024): self-supervised features, no head, 518 px (37 x 37 patches);
    # with registers, the position embeddings cover the patches only.
    "DINOv2-S/14": _paper("S", 14).replace(**_DINOV2),
    "DINOv2-S/14-reg4": _paper("S", 14).replace(num_registers=4, cls_pos_embed=False, **_DINOV2),
    # CLIP's image tower (Radford et al., 2021; OpenAI's ViT-B/16): LayerNorm before the
    # blocks, eps 1e-5, QuickGELU, and the projection into the 512-d joint space as its head.
    "CLIP-B/16": _paper("B", 16).replace(
        norm_pre=True, ln_eps=1e-5, act="quick_gelu", num_classes=512, **_OPENAI_CLIP
    ),
    # SigLIP's image tower (Zhai et al., 2023; timm's vit_base_patch16_siglip_224): no [CLS],
    # attention pooling, GELU's tanh form (as trained), features without a head; as SigLIP's
    # processor, the image resized whole (no crop), mean = std = 0.5.
    "SigLIP-B/16": _paper("B", 16).replace(
        class_token=False, cls_pos_embed=False, pool="map", act="gelu_tanh", num_classes=0
    ),
}


def get_preset(name: str) -> ViTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


__all__ = ["PRESETS", "TextConfig", "ViTConfig", "get_preset"]
