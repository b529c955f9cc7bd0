"""CLIP checkpoints, both towers: vitkit's own, Hugging Face's `CLIPModel`, OpenCLIP's.

A vitkit CLIP directory is the image tower's model directory (every image command reads it as
one) with the text tower beside it: text_config.json, text.safetensors (the text tower and
`logit_scale`) and tokenizer.json. Hugging Face and OpenCLIP directories ship a tokenizer.json
too; its path comes back with the model (data/text.py reads it).

OpenCLIP directories are those its Hub repositories hold: open_clip_config.json (the model's
config under "model_cfg", its preprocessing under "preprocess_cfg") and
open_clip_model.safetensors (or open_clip_pytorch_model.bin, read without unpickling).
Towers OpenCLIP builds from timm or Hugging Face models, attention-pooled towers, and CoCa are
refused by name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from vitkit.config import MAX_PARAMS, TextConfig, ViTConfig, brief
from vitkit.files import atomic_write
from vitkit.model.clip import CLIP
from vitkit.model.text import TextTransformer
from vitkit.model.vit import ViT, state_shapes
from vitkit.rundir import TEXT_CONFIG_FILE, TEXT_WEIGHTS_FILE, TOKENIZER_FILE
from vitkit.weights.foreign import read_state_dict
from vitkit.weights.format import (
    CheckpointError,
    check_weights,
    load_model,
    read_header,
    read_json,
    read_tensors,
    reading,
    resolve_model_dir,
    save_model,
    shape_problems,
)
from vitkit.weights.hf import (
    HFLayout,
    activation_from_hf,
    hf_files,
    layer_norm_eps,
    positive_int,
    rename,
)
from vitkit.weights.hf_families import CLIP as CLIP_LAYOUT
from vitkit.weights.hf_families import CLIP_BLOCK, from_hf_clip, read_some

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# -- Hugging Face -------------------------------------------------------------------------
HF_TEXT = HFLayout(
    {
        "embeddings.token_embedding.weight": "token_embed.weight",
        "embeddings.position_embedding.weight": "pos_embed",
        "final_layer_norm.weight": "norm.weight",
        "final_layer_norm.bias": "norm.bias",
    },
    CLIP_LAYOUT.blocks,
    CLIP_BLOCK,
    CLIP_LAYOUT.qkv,
)
HF_TEXT_PROJECTION = {"text_projection.weight": "proj.weight"}

# -- OpenCLIP: its name -> vitkit's, per block and outside the blocks ---------------------
OPEN_CLIP_BLOCK = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "attn.qkv.weight",  # q, k, v stacked in rows, as vitkit's qkv
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "ls_1.gamma": "ls1.gamma",
    "ls_2.gamma": "ls2.gamma",
}
OPEN_CLIP_VISUAL = {
    "visual.conv1.weight": "patch_embed.proj.weight",
    "visual.class_embedding": "cls_token",
    "visual.positional_embedding": "pos_embed",
    "visual.ln_pre.weight": "norm_pre.weight",
    "visual.ln_pre.bias": "norm_pre.bias",
    "visual.ln_post.weight": "norm.weight",
    "visual.ln_post.bias": "norm.bias",
    "visual.proj": "head.weight",  # (width, embed): used as x @ proj, so transposed
}
OPEN_CLIP_TEXT = {
    "token_embedding.weight": "token_embed.weight",
    "positional_embedding": "pos_embed",
    "ln_final.weight": "norm.weight",
    "ln_final.bias": "norm.bias",
    "text_projection": "proj.weight",  # (width, embed), transposed too
}
# model_cfg settings vitkit builds as OpenCLIP does, with the values it reads them at.
OPEN_CLIP_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
OPEN_CLIP_VISION_KEYS |= {"ls_init_value"}
OPEN_CLIP_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
OPEN_CLIP_PREPROCESS = {
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
    "crop_pct": 1.0,
}


# -- vitkit's own -------------------------------------------------------------------------
def save_clip(clip: CLIP, directory: str | Path, tokenizer_json: str) -> Path:
    """Save both towers and the tokenizer as a vitkit CLIP directory."""
    directory = Path(directory)
    save_model(clip.visual, directory)
    tensors = {f"text.{k}": v for k, v in clip.text.state_dict().items()}
    tensors["logit_scale"] = clip.logit_scale.detach().reshape(1)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}
    atomic_write(directory / TOKENIZER_FILE, tokenizer_json)
    atomic_write(directory / TEXT_WEIGHTS_FILE, save_safetensors(tensors))
    atomic_write(directory / TEXT_CONFIG_FILE, clip.text.config.to_json())
    return directory


def is_clip(src: str | Path) -> bool:
    """Whether `src` is a CLIP that vitkit reads with its text tower."""
    path = Path(src)
    if not path.exists():
        try:
            path = resolve_model_dir(src)
        except CheckpointError:
            return False
    if (path / TEXT_CONFIG_FILE).is_file() or (path / OPEN_CLIP_CONFIG).is_file():
        return True
    hf = path / "config.json"
    if not hf.is_file():
        return False
    try:
        return read_json(hf).get("model_type") == "clip"
    except (CheckpointError, AttributeError, OSError):
        return False


def load_clip(src: str | Path) -> tuple[CLIP, Path]:
    """A CLIP (eval mode) and its tokenizer.json's path from a vitkit, Hugging Face or
    OpenCLIP directory (or a shipped model's name)."""
    directory = resolve_model_dir(src)
    if (directory / OPEN_CLIP_CONFIG).is_file():
        clip = from_open_clip(directory)
    elif (directory / TEXT_CONFIG_FILE).is_file():
        clip = _load_vitkit_clip(directory)
    elif is_clip(directory):
        clip = from_hf_clip_model(directory)
    else:
        raise CheckpointError(
            f"{directory}: not a CLIP (no {TEXT_CONFIG_FILE}, {OPEN_CLIP_CONFIG}, or "
            "Hugging Face CLIPModel config.json): zero-shot needs a text tower"
        )
    tokenizer = directory / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise CheckpointError(f"{directory}: no {TOKENIZER_FILE}; a CLIP needs its tokenizer")
    return clip.eval(), tokenizer


def _load_vitkit_clip(directory: Path) -> CLIP:
    visual = load_model(directory)
    path = directory / TEXT_CONFIG_FILE
    with reading(path):
        config = TextConfig.from_dict(read_json(path))
    weights = directory / TEXT_WEIGHTS_FILE
    with reading(weights):
        header = read_header(weights)
        shapes = {f"text.{k}": v for k, v in text_shapes(config, weights).items()}
        check_weights(weights, header, shapes | {"logit_scale": (1,)})
        tensors = read_tensors(weights, header)
    return _assemble(visual, config, tensors, weights)


def text_shapes(config: TextConfig, path: Path) -> dict[str, tuple[int, ...]]:
    """The text tower's tensors and shapes (a model on the meta device), refusing a config
    that, each size within its bound, makes too many parameters."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in TextTransformer(config).state_dict().items()}
    params = sum(math.prod(s) for s in shapes.values())
    if params > MAX_PARAMS:
        raise CheckpointError(f"{path}: a text tower of {params:,} parameters, too many")
    return shapes


def _assemble(
    visual: ViT, config: TextConfig, tensors: dict[str, torch.Tensor], weights: Path
) -> CLIP:
    """The CLIP of `visual` and a text tower from `tensors` ("text.*" and logit_scale)."""
    text_state = {
        k.removeprefix("text."): v.float() for k, v in tensors.items() if k != "logit_scale"
    }
    problems = shape_problems(
        {k: tuple(v.shape) for k, v in text_state.items()}, text_shapes(config, weights)
    )
    if problems:
        raise CheckpointError(f"{weights}: the text tower does not fit: " + " | ".join(problems))
    text = TextTransformer(config)
    text.load_state_dict(text_state)
    try:
        clip = CLIP(visual, text)
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    scale = tensors["logit_scale"].float().reshape(-1)
    if scale.numel() != 1 or not torch.isfinite(scale).all():
        raise CheckpointError(f"{weights}: logit_scale must be one finite number")
    with torch.no_grad():
        clip.logit_scale.copy_(scale[0])
    return clip


# -- Hugging Face -------------------------------------------------------------------------
def from_hf_clip_model(directory: str | Path) -> CLIP:
    """Both towers of a Hugging Face `CLIPModel` directory."""
    directory = Path(directory)
    visual = from_hf_clip(directory)
    config_path, weights = hf_files(directory)
    with reading(config_path):
        hf = read_json(config_path)
        config = text_config_from_hf(hf)
    if visual.config.num_classes != config.embed_dim:
        raise CheckpointError(f"{weights}: a CLIPModel needs visual_projection.weight")
    with reading(weights):
        state = read_some(weights, _is_text_tower)
        if "logit_scale" not in state:
            raise CheckpointError(f"{weights} lacks logit_scale")
        scale = state.pop("logit_scale")
        ours = rename(state, HF_TEXT, "text_model.", config.depth, extra=HF_TEXT_PROJECTION)
        if ours["pos_embed"].ndim == 2:  # an nn.Embedding's (T, D); another rank is named
            ours["pos_embed"] = ours["pos_embed"][None]
        ours = {f"text.{k}": v for k, v in ours.items()}
        return _assemble(visual, config, ours | {"logit_scale": scale}, weights)


def _is_text_tower(name: str) -> bool:
    return name.startswith(("text_model.", "text_projection.", "logit_scale"))


def text_config_from_hf(hf: Any) -> TextConfig:
    """A TextConfig from a CLIPConfig (as a dict); absent fields take transformers'
    defaults (OpenAI's ViT-B/32 text tower)."""
    if not isinstance(hf, dict) or hf.get("model_type") != "clip":
        raise CheckpointError("not a Hugging Face CLIPModel config (model_type clip)")
    text = hf.get("text_config") or {}
    if not isinstance(text, dict):
        raise CheckpointError(f"text_config must be a JSON object, got {brief(text)}")
    width = positive_int(text, "hidden_size", 512)
    vocab = positive_int(text, "vocab_size", 49408)
    # Older configs say eos_token_id 2, and transformers then pools at the largest id, which
    # CLIP's tokenizer gives the end-of-text token.
    eos = positive_int(text, "eos_token_id", 49407)
    try:
        return TextConfig(
            vocab_size=vocab,
            context_length=positive_int(text, "max_position_embeddings", 77),
            width=width,
            depth=positive_int(text, "num_hidden_layers", 12),
            heads=positive_int(text, "num_attention_heads", 8),
            mlp_ratio=positive_int(text, "intermediate_size", 2048) / width,
            embed_dim=positive_int(hf, "projection_dim", 512),
            act=activation_from_hf(text, "quick_gelu"),
            ln_eps=layer_norm_eps(text, 1e-5),
            eot_id=vocab - 1 if eos == 2 else eos,
        )
    except ValueError as e:
        raise CheckpointError(f"text_config: {e}") from None


# -- OpenCLIP -----------------------------------------------------------------------------
def from_open_clip(directory: str | Path) -> CLIP:
    """Both towers of an OpenCLIP ViT directory (see the module's docstring)."""
    directory = Path(directory)
    config_path = directory / OPEN_CLIP_CONFIG
    weights = next((directory / f for f in OPEN_CLIP_WEIGHTS if (directory / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{directory}: no {' or '.join(OPEN_CLIP_WEIGHTS)}")
    with reading(config_path):
        vision, text = configs_from_open_clip(read_json(config_path))
    with reading(weights):
        state = read_state_dict(weights)
        visual_state, text_state = _rename_open_clip(state, vision.depth, text.depth, weights)
        visual_state["head.bias"] = torch.zeros(vision.num_classes)
        problems = shape_problems(
            {k: tuple(v.shape) for k, v in visual_state.items()},
            state_shapes(vision),
        )
        if problems:
            why = " | ".join(problems)
            raise CheckpointError(f"{weights}: the image tower does not fit: {why}")
        visual = ViT(vision)
        visual.load_state_dict(visual_state)
        return _assemble(visual, text, text_state, weights)


def _rename_open_clip(
    state: dict[str, torch.Tensor], vision_depth: int, text_depth: int, weights: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """OpenCLIP's tensors as vitkit's image tower's and ("text."-prefixed) text tower's."""
    table = dict(OPEN_CLIP_VISUAL)
    table |= {k: f"text.{v}" for k, v in OPEN_CLIP_TEXT.items()} | {"logit_scale": "logit_scale"}
    for prefix, ours, depth in (
        ("visual.transformer.resblocks", "", vision_depth),
        ("transformer.resblocks", "text.", text_depth),
    ):
        for i in range(depth):
            for theirs, mine in OPEN_CLIP_BLOCK.items():
                table[f"{prefix}.{i}.{theirs}"] = f"{ours}blocks.{i}.{mine}"
    unknown = sorted(set(state) - set(table) - {"attn_mask"})
    if unknown:
        raise CheckpointError(f"{weights}: tensors vitkit does not build: {', '.join(unknown[:8])}")
    out = {table[k]: v.float() for k, v in state.items() if k in table}
    for name in ("head.weight", "text.proj.weight"):
        if name in out and out[name].ndim == 2:  # OpenCLIP multiplies by it from the right
            out[name] = out[name].T.contiguous()
    for name, rank in (("cls_token", 1), ("pos_embed", 2), ("text.pos_embed", 2)):
        if name in out and out[name].ndim == rank:
            out[name] = out[name].reshape((1,) * (3 - rank) + tuple(out[name].shape))
    visual = {k: v for k, v in out.items() if not k.startswith("text.") and k != "logit_scale"}
    text = {k: v for k, v in out.items() if k not in visual}
    if "logit_scale" not in text:
        raise CheckpointError(f"{weights} lacks logit_scale")
    return visual, text


def configs_from_open_clip(data: Any) -> tuple[ViTConfig, TextConfig]:
    """The towers' configs from open_clip_config.json; settings vitkit does not build are
    refused by name."""
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise CheckpointError("expected a JSON object with a model_cfg object")
    cfg = data["model_cfg"]
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise CheckpointError("vision_cfg and text_cfg must be JSON objects")
    for name, part, known in (
        ("vision_cfg", vision, OPEN_CLIP_VISION_KEYS),
        ("text_cfg", text, OPEN_CLIP_TEXT_KEYS),
    ):
        odd = sorted(set(part) - known)
        if odd:
            raise CheckpointError(
                f"{name} sets {', '.join(brief(k) for k in odd[:6])}, which vitkit does not "
                "build (it reads OpenCLIP's plain ViT towers)"
            )
    odd = sorted(set(cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"})
    if odd:
        raise CheckpointError(f"model_cfg sets {', '.join(brief(k) for k in odd[:6])}, unsupported")
    act = "quick_gelu" if cfg.get("quick_gelu", False) is True else "gelu"
    embed = positive_int(cfg, "embed_dim", 512)
    width = positive_int(vision, "width", 768)
    patch = positive_int(vision, "patch_size", 16)
    pre = data.get("preprocess_cfg") or {}
    if not isinstance(pre, dict):
        raise CheckpointError("preprocess_cfg must be a JSON object")
    stats = {k: tuple(pre[k]) for k in ("mean", "std") if isinstance(pre.get(k), list)}
    try:
        visual = ViTConfig(
            image_size=positive_int(vision, "image_size", 224),
            patch_size=patch,
            num_classes=embed,
            width=width,
            depth=positive_int(vision, "layers", 12),
            heads=width // positive_int(vision, "head_width", 64),
            mlp_ratio=vision.get("mlp_ratio", 4.0),
            ln_eps=1e-5,
            norm_pre=True,
            act=act,
            layer_scale_init=vision.get("ls_init_value"),
            **(OPEN_CLIP_PREPROCESS | stats),
        )
        text_width = positive_int(text, "width", 512)
        vocab = positive_int(text, "vocab_size", 49408)
        return visual, TextConfig(
            vocab_size=vocab,
            context_length=positive_int(text, "context_length", 77),
            width=text_width,
            depth=positive_int(text, "layers", 12),
            heads=positive_int(text, "heads", 8),
            mlp_ratio=text.get("mlp_ratio", 4.0),
            embed_dim=embed,
            act=act,
            # OpenCLIP pools at the largest id, its tokenizer's end-of-text token.
            eot_id=vocab - 1,
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"model_cfg: {e}") from None
