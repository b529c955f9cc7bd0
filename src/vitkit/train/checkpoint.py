"""Training state (weights, optimiser, EMA, step): saved atomically, loaded without pickle code.

The state is a plain tree of tensors, numbers and strings, so `torch.load(weights_only=True)`
reads it; nothing in the file can run code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from vitkit.weights.format import CheckpointError, atomic_write

STATE_FILE = "checkpoints/last.pt"


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(run_dir / STATE_FILE, buf.getvalue())


def load_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; nothing to resume in {run_dir}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"{path}: unreadable training state ({e})") from None
