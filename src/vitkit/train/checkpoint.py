"""Training state (weights, optimiser, EMA, step): saved atomically, restored on any number of
processes.

A run that is not sharded keeps one file, `checkpoints/last.pt`, written by rank 0: a plain
tree of tensors, numbers and strings, so `torch.load(weights_only=True)` reads it and nothing in
it can run code. A sharded run (FSDP2) keeps each process's shards in a directory of
`torch.distributed.checkpoint`, which reshards them on load for any number of processes, and
`checkpoints/last.json` (step, settings) names the newest such directory. That format's own
index is a pickle: resume only runs you trust.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.weights.format import CheckpointError, atomic_write

CHECKPOINTS = "checkpoints"
STATE_FILE = f"{CHECKPOINTS}/last.pt"
SHARDED_STATE_FILE = f"{CHECKPOINTS}/last.json"
SHARDS_PREFIX = "step-"


def save(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: list[torch.Tensor] | None,
    meta: dict[str, Any],
    sharded: bool,
    main: bool,
) -> None:
    """Save the state of a run at `meta["step"]`; every process calls this."""
    if sharded:
        _save_sharded(run_dir, _sharded_tensors(model, optimizer, ema), meta, main)
    elif main:
        tensors = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema}
        buf = io.BytesIO()
        torch.save(meta | tensors, buf)
        atomic_write(run_dir / STATE_FILE, buf.getvalue())
        _remove_sharded(run_dir)


def restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: list[torch.Tensor] | None,
    state: dict[str, Any],
) -> None:
    """Load `state` (from load_state) into the model, optimiser and EMA, however sharded."""
    if "shards" in state:
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import set_state_dict

        tensors = _sharded_tensors(model, optimizer, ema)
        load(tensors, checkpoint_id=state["shards"])  # in place, resharded as these are
        set_state_dict(
            model,
            optimizer,
            model_state_dict=tensors["model"],
            optim_state_dict=tensors["optimizer"],
        )
        return
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        for e, saved in zip(ema, state["ema"], strict=True):
            e.copy_(saved)


def load_state(run_dir: Path) -> dict[str, Any]:
    """The newest state of a run: the tensors themselves, or for a sharded run, where they are
    (`shards`)."""
    pointer = run_dir / SHARDED_STATE_FILE
    if pointer.is_file():
        try:
            state = json.loads(pointer.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{pointer}: unreadable training state ({e})") from None
        state["shards"] = str(pointer.parent / state["shards"])
        return state
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; nothing to resume in {run_dir}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"{path}: unreadable training state ({e})") from None


def _sharded_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, ema: list[torch.Tensor] | None
) -> dict[str, Any]:
    """Everything a sharded run saves, each tensor as this process's shards, keyed by names
    (not positions) so that any number of processes can load it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    tensors = {"model": weights, "optimizer": optim}
    if ema is not None:
        names = [name for name, _ in model.named_parameters()]
        tensors["ema"] = dict(zip(names, ema, strict=True))
    return tensors


def _save_sharded(run_dir: Path, tensors: dict[str, Any], meta: dict[str, Any], main: bool) -> None:
    """Every process writes its shards into a new directory; only then does rank 0 point
    last.json at it and remove older ones, so a crash while writing leaves the last state whole."""
    from torch.distributed.checkpoint import save

    name = f"{SHARDS_PREFIX}{meta['step']}"
    save(tensors, checkpoint_id=run_dir / CHECKPOINTS / name)  # returns once all have written
    if main:
        atomic_write(run_dir / SHARDED_STATE_FILE, json.dumps(meta | {"shards": name}) + "\n")
        _remove_sharded(run_dir, keep=name)
        (run_dir / STATE_FILE).unlink(missing_ok=True)


def _remove_sharded(run_dir: Path, keep: str | None = None) -> None:
    """Drop sharded states other than `keep` (all of them, and their pointer, if None)."""
    if keep is None:
        (run_dir / SHARDED_STATE_FILE).unlink(missing_ok=True)
    for old in (run_dir / CHECKPOINTS).glob(f"{SHARDS_PREFIX}*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
