"""Checkpoints: vitkit's own format, and converters from timm, Hugging Face and Google."""

from functools import partial
from pathlib import Path

from vitkit.infer.labels import imagenet1k_labels
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
    """A model from any checkpoint vitkit reads, its format guessed unless given.

    `hf:<repo>` and `timm:<repo>` name Hugging Face Hub repositories, downloaded (and cached)
    with `huggingface_hub` when the network allows.
    """
    from vitkit.weights.hf import from_hf
    from vitkit.weights.npz import from_npz
    from vitkit.weights.timm import from_timm

    if str(src).startswith(("hf:", "timm:")):
        fmt, src = download(str(src))
    fmt = fmt or guess_format(src)
    if fmt == "vitkit":
        return load_model(src)
    readers = {"timm": partial(from_timm, heads=heads), "hf": from_hf, "npz": from_npz}
    model = readers[fmt](src)
    if model.labels is None and model.config.num_classes == 1000:
        model.labels = imagenet1k_labels()  # a 1000-class head is ImageNet-1k's
    return model


def download(name: str) -> tuple[str, Path]:
    """(format, local path) for `hf:<repo>` (a transformers directory) or `timm:<repo>`."""
    fmt, _, repo = name.partition(":")
    local = {
        "hf": "a local Hugging Face directory (config.json + model.safetensors)",
        "timm": "a local timm weights file (model.safetensors or pytorch_model.bin)",
    }[fmt]
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{name}: downloading needs huggingface_hub (pip install "
            f"huggingface_hub); or pass {local}"
        ) from None
    try:
        if fmt == "hf":
            return "hf", Path(
                huggingface_hub.snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"])
            )
        repo = repo if "/" in repo else f"timm/{repo}"
        return "timm", Path(huggingface_hub.hf_hub_download(repo, "model.safetensors"))
    except Exception as e:  # offline, unknown repository, gated model, ...
        reason = " ".join(str(e).split())  # on one line
        raise CheckpointError(
            f"{name}: cannot download ({type(e).__name__}: {reason}); without a "
            f"network, pass {local} instead"
        ) from None


__all__ = [
    "FORMATS",
    "CheckpointError",
    "atomic_write",
    "download",
    "guess_format",
    "load_model",
    "load_pretrained",
    "save_model",
]
