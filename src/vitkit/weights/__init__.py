"""Checkpoints: vitkit's own format, and converters from timm, Hugging Face and Google."""

from pathlib import Path

from vitkit.model.vit import ViT
from vitkit.weights.format import CheckpointError, atomic_write, load_model, save_model

FORMATS = ("vitkit", "timm", "hf", "npz")


def guess_format(src: str | Path) -> str:
    """npz for Google's files, timm for other weights files, hf for a transformers
    directory, vitkit for ours (or a shipped model's name)."""
    import json

    src = Path(src)
    if src.is_dir():
        config = src / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("model_type") == "vit":
            return "hf"
        return "vitkit"
    if src.suffix == ".npz":
        return "npz"
    return "timm" if src.is_file() else "vitkit"


def load_pretrained(src: str | Path, fmt: str | None = None, heads: int | None = None) -> ViT:
    """A model from any checkpoint vitkit reads, its format guessed unless given."""
    from vitkit.weights.hf import from_hf
    from vitkit.weights.npz import from_npz
    from vitkit.weights.timm import from_timm

    fmt = fmt or guess_format(src)
    if fmt == "timm":
        return from_timm(src, heads=heads)
    if fmt == "hf":
        return from_hf(src)
    if fmt == "npz":
        return from_npz(src)
    return load_model(src)


__all__ = [
    "FORMATS",
    "CheckpointError",
    "atomic_write",
    "guess_format",
    "load_model",
    "load_pretrained",
    "save_model",
]
