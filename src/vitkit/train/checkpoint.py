"""Training state (weights, optimisers, EMA, step): safetensors and JSON only, written so that a
kill at any moment leaves the previous state whole, and resumed on any number of processes.

A run keeps its states in `checkpoints/`:

    step-<N>/           one complete state: state.json (step, settings, optimisers' settings)
                        and safetensors files of tensors (one file per writing process)
    last.json           {"state": "step-<N>"}: the newest complete state
    step-<N>.partial/   a state being written; a kill leaves it behind, the next start drops it

Tensors go through `torch.distributed.checkpoint` with its Hugging Face storage (safetensors
shards whose headers are the whole index), so a sharded (FSDP2) state is redistributed for any
number of processes as it loads. Nothing in a run directory is ever unpickled: every file in it
may come from someone else, so names, sizes and types are checked before they are used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.files import atomic_write, fsync_dir
from vitkit.rundir import (
    BEST_DIR,
    CHECKPOINTS,
    LEGACY_STATE_FILE,
    PARTIAL_SUFFIX,
    POINTER_FILE,
    STATE_JSON,
    STATE_PREFIX,
)
from vitkit.weights.format import CheckpointError

FORMAT_VERSION = 1
# A state.json is a few kilobytes; anything far larger is not one of ours.
MAX_STATE_JSON_BYTES = 16 * 2**20
_STATE_NAME = re.compile(r"step-(\d{1,12})")


@dataclass
class SavedState:
    """A complete state on disk: where it is and what its state.json says."""

    path: Path
    step: int
    meta: dict[str, Any]


def save(
    run_dir: Path,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    ema: list[torch.Tensor] | None,
    meta: dict[str, Any],
    sharded: bool,
    main: bool,
) -> None:
    """Save the state of a run at `meta["step"]`; every process calls this.

    Sharded, every process writes its own shards; otherwise rank 0 writes everything. The state
    is written into `step-<N>.partial/`, renamed to `step-<N>/` once complete, and only then
    named in last.json; the state before it is kept as a fallback, older ones removed.
    """
    checkpoints = run_dir / CHECKPOINTS
    name = f"{STATE_PREFIX}{meta['step']}"
    final, partial = checkpoints / name, checkpoints / f"{name}{PARTIAL_SUFFIX}"
    if not (sharded or main):
        return  # a replicated state is rank 0's to write
    if final.is_dir():
        return  # saved already: stopped right after resuming
    tensors, plain = _state_tensors(model, optimizers, ema)
    dcp = _dcp()
    writer = dcp.HuggingFaceStorageWriter(
        str(partial), fqn_to_index_mapping=_files(tensors), save_distributed=True
    )
    with _quiet_single_process():  # returns once every process has written and synced its files
        dcp.save(tensors, storage_writer=writer, no_dist=not sharded)
    if not main:
        return
    atomic_write(partial / STATE_JSON, json.dumps(meta | plain | {"format": FORMAT_VERSION}))
    fsync_dir(partial)
    previous = _pointed_name(checkpoints)
    os.replace(partial, final)
    fsync_dir(checkpoints)
    atomic_write(checkpoints / POINTER_FILE, json.dumps({"state": name}) + "\n")
    for old in checkpoints.iterdir():
        if _STATE_NAME.fullmatch(old.name) and old.name not in (name, previous):
            shutil.rmtree(old, ignore_errors=True)
    (checkpoints / LEGACY_STATE_FILE).unlink(missing_ok=True)


def clean(run_dir: Path) -> None:
    """Remove what a killed process left half-written: partial states and temporary files."""
    for directory in (run_dir, run_dir / BEST_DIR, run_dir / CHECKPOINTS):
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file():
                path.unlink(missing_ok=True)
            elif path.name.endswith(PARTIAL_SUFFIX) and directory.name == CHECKPOINTS:
                shutil.rmtree(path, ignore_errors=True)


def find_states(run_dir: Path, warn: bool = True) -> list[SavedState]:
    """The run's complete states, the one last.json names first, then the others newest first.

    Anything that is not a state vitkit wrote (a pointer outside `checkpoints/`, a legacy
    pickle, a directory without a valid state.json) is skipped, and said so on stderr when
    `warn`; no state at all is a CheckpointError that lists what was refused.
    """
    checkpoints = run_dir / CHECKPOINTS
    refused: list[str] = []
    if (checkpoints / LEGACY_STATE_FILE).exists():
        refused.append(
            f"{checkpoints / LEGACY_STATE_FILE}: a pickled training state (older vitkit); "
            "never loaded, since a pickle can run code"
        )
    first = _pointed_name(checkpoints, refused)
    names = [d.name for d in checkpoints.iterdir()] if checkpoints.is_dir() else []
    steps = sorted(
        (int(m.group(1)) for n in names if (m := _STATE_NAME.fullmatch(n))), reverse=True
    )
    order = [first] if first is not None else []
    order += [f"{STATE_PREFIX}{s}" for s in steps if f"{STATE_PREFIX}{s}" != first]
    states = []
    for name in order:
        try:
            states.append(_read_state(checkpoints / name))
        except CheckpointError as e:
            refused.append(str(e))
    if not states:
        why = "".join(f"\n  refused: {r}" for r in refused)
        raise CheckpointError(f"{checkpoints}: no saved training state; nothing to resume{why}")
    if warn:
        for reason in refused:
            print(f"warning: resume: refused {reason}", file=sys.stderr)
    return states


def restore(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    ema: list[torch.Tensor] | None,
    state: SavedState,
) -> None:
    """Load `state` into the model, optimisers and EMA, however they are sharded now."""
    tensors, _ = _state_tensors(model, optimizers, ema)
    sharded = _is_sharded(model)
    dcp = _dcp()
    try:
        with _quiet_single_process():
            dcp.load(
                tensors,
                storage_reader=dcp.HuggingFaceStorageReader(str(state.path)),
                no_dist=not sharded,
            )
        dcp.state_dict.set_state_dict(
            model,
            optimizers,
            model_state_dict=tensors["model"],
            optim_state_dict={
                "state": tensors["optimizer"],
                "param_groups": state.meta["param_groups"],
            },
        )
    # torch raises many types for missing, misshapen or corrupt tensors; the checkpointer wraps
    # them in a CheckpointException, which is a BaseException.
    except (Exception, dcp.api.CheckpointException) as e:
        reason = " ".join(str(e).split())[:500]
        raise CheckpointError(
            f"{state.path}: does not hold this run's model and optimiser ({reason})"
        ) from None


def _state_tensors(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    ema: list[torch.Tensor] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything a state holds: its tensors (each as this process's shards, keyed by names,
    not positions, so that any number of processes can load them) and the optimisers'
    settings, which are plain values for state.json. Several optimisers (AdamW and Muon) make
    one state, each parameter's under its name: every parameter has one optimiser."""
    weights, optim = _dcp().state_dict.get_state_dict(model, optimizers)
    for name, values in optim["state"].items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimiser state {name}.{key} is not a tensor")
    tensors = {"model": weights, "optimizer": optim["state"]}
    if ema is not None:
        names = [name for name, _ in model.named_parameters()]
        tensors["ema"] = dict(zip(names, ema, strict=True))
    return tensors, {"param_groups": optim["param_groups"]}


def _files(tensors: dict[str, Any]) -> dict[str, int]:
    """Which file each tensor goes to: the weights, the EMA and each kind of optimiser state
    apart, since a file is assembled in memory before it is written; that bounds the extra
    memory a save takes to about one copy of the weights."""
    index = {f"model.{name}": 1 for name in tensors["model"]}
    index |= {f"ema.{name}": 2 for name in tensors.get("ema", {})}
    kinds = sorted({kind for values in tensors["optimizer"].values() for kind in values})
    for name, values in tensors["optimizer"].items():
        index |= {f"optimizer.{name}.{kind}": 3 + kinds.index(kind) for kind in values}
    return index


def _read_state(path: Path) -> SavedState:
    """A state directory's state.json, checked to be one that vitkit wrote."""
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"{path}: not a state directory")
    meta_path = path / STATE_JSON
    if not meta_path.is_file():
        legacy = " (its .metadata index is a pickle and is never read)"
        extra = legacy if (path / ".metadata").exists() else ""
        raise CheckpointError(f"{path}: no {STATE_JSON}{extra}")
    try:
        if meta_path.stat().st_size > MAX_STATE_JSON_BYTES:
            raise ValueError(f"larger than {MAX_STATE_JSON_BYTES} bytes")
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        _check_meta(meta, path.name)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: not a vitkit training state ({e})") from None
    return SavedState(path, meta["step"], meta)


def _check_meta(meta: dict[str, Any], name: str) -> None:
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or name != f"{STATE_PREFIX}{step}":
        raise ValueError(f"step {step!r} does not match its directory {name}")
    for key in ("train_config", "model_config"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"{key} must be an object")
    groups = meta.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        raise ValueError("param_groups must be a list of objects with params")
    best = meta.get("best_val_acc")
    if best is not None and not isinstance(best, float | int):
        raise ValueError("best_val_acc must be a number")


def _pointed_name(checkpoints: Path, refused: list[str] | None = None) -> str | None:
    """The state last.json names, if it names one inside `checkpoints/` as step-<N>; what it
    names otherwise is refused (and said in `refused`), never followed."""
    pointer = checkpoints / POINTER_FILE
    if not pointer.is_file():
        return None
    try:
        if pointer.stat().st_size > MAX_STATE_JSON_BYTES:
            raise ValueError("too large")
        data = json.loads(pointer.read_text())
    except (OSError, ValueError) as e:
        if refused is not None:
            refused.append(f"{pointer}: unreadable ({e})")
        return None
    name = data.get("state") if isinstance(data, dict) else None
    if isinstance(name, str) and _STATE_NAME.fullmatch(name):
        return name
    if refused is not None:
        named = {k: v for k, v in data.items() if k in ("state", "shards")} or data
        refused.append(
            f"{pointer}: names {json.dumps(named)[:200]}; a state is only ever a "
            f"{STATE_PREFIX}<N> directory inside {checkpoints}"
        )
    return None


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _dcp() -> Any:
    """`torch.distributed.checkpoint`, imported on first use: it takes 1.5 s, which every
    `vitkit` command would otherwise pay at start-up."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.api
    import torch.distributed.checkpoint.state_dict  # noqa: F401 - submodules used as dcp.*

    return dcp


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """torch.distributed.checkpoint warns each time it runs without a process group, which is
    what a process alone (or rank 0 saving a replicated state) means to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
