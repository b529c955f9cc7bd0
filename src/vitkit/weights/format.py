"""vitkit's checkpoint format: a directory with config.json, model.safetensors, labels.json
and, for trained models, calibration.safetensors (sample images for int8 inference).

No pickle anywhere: weights are safetensors, metadata is JSON, every file is written
atomically (temporary file, then rename) so an interrupted save never leaves a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vitkit.config import ViTConfig
from vitkit.model.vit import ViT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LABELS_FILE = "labels.json"
CALIBRATION_FILE = "calibration.safetensors"
# Names that mean a model shipped inside the package (see `shipped/`).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "shipped"


_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model it claims to be."""


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: ViT, directory: str | Path, labels: list[str] | None = None) -> Path:
    """Save `model` (and its labels, if any) as a vitkit model directory."""
    directory = Path(directory)
    labels = labels if labels is not None else model.labels
    _check_labels(labels, model.config.num_classes)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, save_safetensors(tensors, metadata={"format": "pt"}))
    if labels is not None:
        atomic_write(directory / LABELS_FILE, json.dumps(labels, indent=1) + "\n")
    if model.calibration is not None:
        images = {"images": model.calibration.cpu().contiguous()}
        atomic_write(directory / CALIBRATION_FILE, save_safetensors(images))
    atomic_write(directory / CONFIG_FILE, model.config.to_json())
    return directory


def resolve_model_dir(dir_or_name: str | Path) -> Path:
    """A model directory (or training run directory), or the name of a shipped model."""
    path = Path(dir_or_name)
    if not path.exists() and (SHIPPED_DIR / str(dir_or_name)).is_dir():
        path = SHIPPED_DIR / str(dir_or_name)
    if not path.is_dir():
        shipped = sorted(p.name for p in SHIPPED_DIR.iterdir()) if SHIPPED_DIR.is_dir() else []
        names = f" or a shipped model name ({', '.join(shipped)})" if shipped else ""
        raise CheckpointError(f"{dir_or_name}: not a model directory{names}")
    return path


def load_config(directory: str | Path) -> ViTConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a model directory needs {CONFIG_FILE}")
    try:
        return ViTConfig.from_file(path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_model(dir_or_name: str | Path, image_size: int | None = None) -> ViT:
    """Load a model directory; `image_size` resamples position embeddings for a new size."""
    directory = resolve_model_dir(dir_or_name)
    config = load_config(directory)
    model = ViT(config)
    load_weights(model, directory / WEIGHTS_FILE)
    model.labels = load_labels(directory, config.num_classes)
    model.calibration = load_calibration(directory, config.in_channels)
    if image_size is not None:
        model.set_image_size(image_size)
    return model.eval()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_safetensors(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (corrupt or truncated?): {e}"
        ) from None


def load_weights(model: ViT, path: Path) -> None:
    """Copy weights into `model`, naming every missing, unexpected or misshapen tensor."""
    state = read_safetensors(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong))
    if problems:
        raise CheckpointError(f"{path} does not match its config.json: " + " | ".join(problems))
    model.load_state_dict(state)


def load_labels(directory: Path, num_classes: int) -> list[str] | None:
    path = directory / LABELS_FILE
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    try:
        _check_labels(labels, num_classes)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return labels


def load_calibration(directory: Path, channels: int) -> torch.Tensor | None:
    """The sample images saved with a trained model, uint8 (N, C, H, W), if any."""
    path = directory / CALIBRATION_FILE
    if not path.is_file():
        return None
    images = read_safetensors(path).get("images")
    if images is None or images.dtype != torch.uint8 or images.ndim != 4:
        raise CheckpointError(f"{path}: expected one uint8 (N, C, H, W) tensor named 'images'")
    if images.shape[0] == 0 or images.shape[1] != channels:
        raise CheckpointError(
            f"{path}: {tuple(images.shape)} images for a {channels}-channel model"
        )
    return images


def _check_labels(labels: object, num_classes: int) -> None:
    if labels is None:
        return
    if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
        raise ValueError("labels must be a list of strings")
    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels for a model with {num_classes} classes")
