"""Checkpoints: vitkit's own format, and converters from timm, Hugging Face and Google."""

import contextlib
import re
from functools import partial
from pathlib import Path

from vitkit.model.vit import ViT
from vitkit.weights.format import (
    CheckpointError,
    atomic_write,
    load_model,
    one_line,
    read_json,
    save_model,
)
from vitkit.weights.hf_families import from_hf_auto
from vitkit.weights.imagenet import imagenet1k_labels
from vitkit.weights.npz import from_npz
from vitkit.weights.timm import from_timm

FORMATS = ("vitkit", "timm", "hf", "npz")


def guess_format(src: str | Path) -> str:
    """npz for Google's files, timm for other weights files, hf for a transformers
    directory (its config.json names a model_type, which vitkit's never does), vitkit for ours
    (or a shipped model's name)."""
    src = Path(src)
    if src.is_dir():
        config = src / "config.json"
        if config.is_file():
            data = read_json(config)
            if isinstance(data, dict) and "model_type" in data:
                return "hf"  # a model_type vitkit does not read is refused there, by name
        return "vitkit"
    if src.suffix == ".npz":
        return "npz"
    return "timm" if src.is_file() else "vitkit"


def load_pretrained(src: str | Path, fmt: str | None = None, heads: int | None = None) -> ViT:
    """A model from any checkpoint vitkit reads, its format guessed unless given.

    A Hugging Face directory is read by its config.json's model_type: ViT, DINOv2 (with or
    without registers), CLIP's image tower (see `hf_families`).

    `hf:<repo>` and `timm:<repo>` name Hugging Face Hub repositories, downloaded (and cached)
    with `huggingface_hub` when the network allows; `@<revision>` (a commit, tag or branch)
    after the name picks a version. The commit it resolved to is kept in the model's
    `config.source`, so that a saved model names exactly what it came from.
    """
    source = None
    if str(src).startswith(("hf:", "timm:")):
        fmt, src, source = download(str(src))
    fmt = fmt or guess_format(src)
    if fmt == "vitkit":
        return load_model(src)
    readers = {"timm": partial(from_timm, heads=heads), "hf": from_hf_auto, "npz": from_npz}
    model = readers[fmt](src)
    if source is not None:
        model.config = model.config.replace(source=source)
    if model.labels is None and model.config.num_classes == 1000:
        model.labels = imagenet1k_labels()  # a 1000-class head is ImageNet-1k's
    return model


def download(name: str) -> tuple[str, Path, str]:
    """(format, local path, pinned name) for `hf:<repo>[@<revision>]` (a transformers
    directory) or `timm:<repo>[@<revision>]`; the pinned name ends in the commit it resolved
    to."""
    fmt, _, rest = name.partition(":")
    repo, at, revision = rest.partition("@")
    if not repo or (at and not revision):
        raise CheckpointError(f"{name}: expected {fmt}:<repo> or {fmt}:<repo>@<revision>")
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
            path = huggingface_hub.snapshot_download(
                repo, revision=revision or None, allow_patterns=["*.json", "*.safetensors"]
            )
        else:
            hub_repo = repo if "/" in repo else f"timm/{repo}"
            path = huggingface_hub.hf_hub_download(
                hub_repo, "model.safetensors", revision=revision or None
            )
            # timm's config.json (its pretrained_cfg names the eval crop) lands beside the
            # weights, where `from_timm` reads it; a repository without one still loads.
            with contextlib.suppress(Exception):
                huggingface_hub.hf_hub_download(hub_repo, "config.json", revision=revision or None)
    except Exception as e:  # offline, unknown repository or revision, gated model, ...
        raise CheckpointError(
            f"{name}: cannot download ({type(e).__name__}: {one_line(str(e))}); without a "
            f"network, pass {local} instead"
        ) from None
    commit = _snapshot_commit(Path(path)) or revision
    return fmt, Path(path), f"{fmt}:{repo}@{commit}" if commit else name


def _snapshot_commit(path: Path) -> str | None:
    """The commit a Hub cache path belongs to: `.../snapshots/<40 hex digits>/...`."""
    for parent, part in zip(path.parts, path.parts[1:], strict=False):
        if parent == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", part):
            return part
    return None


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
