"""One run across several processes: the process group torchrun describes, and what the loop
needs of it.

torchrun (on one machine or several) starts one process per device and tells each its place in
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; every process then runs the same
training loop. Without torchrun a process is alone, holds no process group, and every helper
here reduces to its single-process meaning.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vitkit.model.vit import ViT

# How long a collective may wait for the other processes before the run gives up. A process
# that dies on this machine closes its connections and the others fail at once; one lost with
# its machine (or hung) only shows as silence, and this bounds it. It must exceed the longest
# pause rank 0 makes alone: evaluating the held-out data and writing the model each epoch.
TIMEOUT_ENV = "VITKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


class LostProcessError(RuntimeError):
    """Another process of the job died or stopped answering, so this one stops too."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank `rank` of `size`, training on `device`."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that evaluates, logs and writes files for the run."""
        return self.rank == 0

    def micro_batches(self, batch_size: int, accum: int) -> list[tuple[int, slice, float]]:
        """This process's micro-batches of a global batch: (global index, slice, loss weight).

        The batch is cut into size x accum near-equal consecutive parts, and rank r takes parts
        r * accum to (r + 1) * accum - 1: every image belongs to exactly one process. The
        processes average their gradients and micro-batches add theirs up, so weighing each
        micro-batch's mean loss by size x its share of the batch gives every step the gradient
        of the whole batch's mean loss.
        """
        n = self.size * accum
        if batch_size < n:
            raise ValueError(
                f"batch size {batch_size} is smaller than {self.size} process(es) x "
                f"{accum} micro-batch(es)"
            )
        edges = [batch_size * j // n for j in range(n + 1)]
        first = self.rank * accum
        return [
            (j, slice(edges[j], edges[j + 1]), (edges[j + 1] - edges[j]) * self.size / batch_size)
            for j in range(first, first + accum)
        ]

    def sum(self, values: Sequence[float]) -> list[float]:
        """`values` added up over all processes."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every process."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def check_same(self, value: int, what: str) -> None:
        """Raise unless every process holds the same `value`."""
        if self.size == 1:
            return
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t[0] != -t[1]:
            raise ValueError(
                f"the processes disagree on {what} (from {int(-t[1])} to {int(t[0])}); "
                "is the run directory on a filesystem that every process sees?"
            )


def rank() -> int:
    """This process's rank in the job torchrun started (0 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def launched_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(requested: str | None) -> torch.device:
    """`requested`, else this process's own GPU (LOCAL_RANK under torchrun), else the CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@contextlib.contextmanager
def joined(device: torch.device, shard: bool) -> Iterator[World]:
    """This process's World for the length of a run, with its process group.

    The group is the one torchrun describes (made here and torn down after), or one the caller
    already made; a process alone has none, except a group of one to shard. NCCL connects GPUs,
    gloo CPUs. A collective that fails because another process is gone becomes a
    LostProcessError.
    """
    if dist.is_available() and dist.is_initialized():
        with _lost_process_is_clear():
            yield World(dist.get_rank(), dist.get_world_size(), device)
        return
    size = launched_size()
    if size == 1 and not shard:
        yield World(0, 1, device)
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size == 1:  # FSDP needs a group, even of one: its store in memory, no network
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        dist.init_process_group(
            backend,
            timeout=timedelta(seconds=seconds),
            device_id=device if device.type == "cuda" else None,
        )
    try:
        with _lost_process_is_clear():
            yield World(dist.get_rank(), size, device)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _lost_process_is_clear() -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:
        # NCCL and the rendezvous store raise DistError; gloo's transport a RuntimeError that
        # names its source file.
        if not isinstance(e, dist.DistError) and "gloo/transport/" not in str(e):
            raise
        raise LostProcessError(
            f"process {dist.get_rank()} of {dist.get_world_size()}: another process of the "
            f"job died or stopped answering, so this one stops too ({e}); once every process "
            "can run, continue with --resume"
        ) from e


def wrap(model: ViT, world: World, shard: bool) -> nn.Module:
    """What forward and backward run through: `model` sharded in place by FSDP2 (each block,
    then the rest), `model` in DistributedDataParallel, or `model` itself when alone."""
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(world.device.type, (world.size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if world.size > 1:
        ids = [world.device.index] if world.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


@contextlib.contextmanager
def grad_sync(net: nn.Module, sync: bool) -> Iterator[None]:
    """Forward and backward of one micro-batch, exchanging gradients between the processes only
    if `sync` (the step's last micro-batch); the others accumulate theirs locally."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(net, FSDPModule):
        net.set_requires_gradient_sync(sync)
    if isinstance(net, nn.parallel.DistributedDataParallel) and not sync:
        with net.no_sync():
            yield
        return
    yield


def local(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The part of each tensor that this process holds (all of it, unless sharded), detached:
    in-place updates of these update the tensors."""
    from torch.distributed.tensor import DTensor

    return [t.detach().to_local() if isinstance(t, DTensor) else t.detach() for t in tensors]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's weights, whole, on rank 0's CPU (empty elsewhere); every process takes
    part in gathering them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
