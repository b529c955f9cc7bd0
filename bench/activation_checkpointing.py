"""Activation checkpointing on this machine: a training step's time and memory with and without
recomputing each block's activations in the backward pass (`--checkpoint-activations`).

    .venv/bin/python bench/activation_checkpointing.py                        # S/16, batch 32
    .venv/bin/python bench/activation_checkpointing.py --model B/16 --batch 16 --steps 3

Each setting runs in a process of its own, since a process's peak RSS only grows: the model,
AdamW (fused, as training uses it) and a batch of random images at the preset's size; a step on
one image (kernels loaded, optimiser state made), a warm-up step, then `--steps` timed ones, the
median kept. A step is forward, backward and the update. The settings take turns for
`--repeats` rounds and each keeps its fastest, since other work on the machine only slows a
step. Memory is measured two ways: the bytes autograd keeps
for the backward pass (the storages the forward saves, each once, weights excluded), and the
process's peak RSS during the whole-batch steps above its RSS before them (activations,
gradients, workspace and allocator slack).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from vitkit import create_model
from vitkit.runtime import auto_bf16, cpu_name, reuse_freed_memory
from vitkit.train.optim import build_optimizer

MIB = 2**20


def rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(preset: str, batch: int, steps: int, checkpointing: bool, bf16: bool) -> dict:
    """Median step seconds, bytes saved for backward, and peak RSS growth, of one setting."""
    reuse_freed_memory()  # as training does: freed activations are kept for the next step
    model = create_model(preset, seed=0).train()
    model.set_grad_checkpointing(checkpointing)
    optimizer = build_optimizer(model, 1e-3, 0.05, fused=True)
    size = model.config.image_size
    x = torch.randn(batch, model.config.in_channels, size, size)
    y = torch.randint(model.config.num_classes, (batch,))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # a tensor saved by several operations counts once
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        saved.clear()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        ):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        return time.perf_counter() - start

    step(x[:1], y[:1])  # loads the kernels and makes the optimiser state
    before = rss_bytes()
    times = [step(x, y) for _ in range(steps + 1)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "seconds": statistics.median(times[1:]),
        "saved": sum(saved.values()),
        "rss": peak - before,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["S/16"], help="presets, e.g. S/16 B/16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    p.add_argument("--repeats", type=int, default=2, help="rounds; each keeps its fastest")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--one", metavar="PRESET", help=argparse.SUPPRESS)  # a child: one setting
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    bf16 = auto_bf16(torch.device("cpu")) if a.precision == "auto" else a.precision == "bf16"
    if a.one:
        print(json.dumps(measure(a.one, a.batch, a.steps, a.checkpointing, bf16)))
        return

    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, load average")
    print(f"{os.getloadavg()[0]:.2f}; batch {a.batch}, {'bf16' if bf16 else 'fp32'}, median of")
    print(f"{a.steps} steps after a warm-up, the faster of {a.repeats} rounds")
    heads = ("model", "checkpoint", "step s", "saved MiB", "peak RSS +MiB")
    print(" ".join(f"{h:>13}" for h in heads))
    for preset in a.model:
        best: dict[bool, dict] = {}
        for _ in range(a.repeats):  # the settings take turns, so that other work slows both
            for checkpointing in (False, True):
                cmd = [sys.executable, __file__, "--one", preset, "--batch", str(a.batch)]
                cmd += ["--steps", str(a.steps), "--precision", "bf16" if bf16 else "fp32"]
                cmd += ["--checkpointing"] if checkpointing else []
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.splitlines()[-1])
                if checkpointing not in best or r["seconds"] < best[checkpointing]["seconds"]:
                    best[checkpointing] = r
        for checkpointing, r in best.items():
            cells = (preset, "on" if checkpointing else "off", f"{r['seconds']:.2f}")
            cells += (f"{r['saved'] / MIB:.0f}", f"{r['rss'] / MIB:.0f}")
            print(" ".join(f"{c:>13}" for c in cells))
        ratios = (f"{best[True][k] / best[False][k]:.2f}x" for k in ("seconds", "saved", "rss"))
        print(" ".join(f"{c:>13}" for c in (preset, "on / off", *ratios)), flush=True)


if __name__ == "__main__":
    main()
