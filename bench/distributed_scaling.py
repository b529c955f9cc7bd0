"""Scaling of training over processes on this machine: the Fashion-MNIST 15-minute recipe's
model for a fixed number of steps, on 1 process and on N (torchrun, gloo), same global batch.

    .venv/bin/python bench/distributed_scaling.py                  # 100 steps; 1 and 2 processes
    .venv/bin/python bench/distributed_scaling.py --steps 200 --shard

Throughput is the run's own `images_per_second` (its training steps only: start-up, data
loading and the final evaluation are excluded); the whole command's wall time is shown too.
N processes share the cores equally as torch threads. Scaling efficiency compares them with N
times one process on one core's share; "vs 1 process" with one process using every core (on
a machine of N cores, the most that N processes can give is that). The settings take turns for
`--repeats` rounds and each keeps its best round: other work on the machine only slows a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitkit.runtime import cpu_name

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist_15min.toml"


def threads(procs: int) -> int:
    return max(1, (os.cpu_count() or 1) // procs)


def run(procs: int, threads: int, shard: bool, steps: int, out: Path) -> tuple[float, float]:
    """Images/s of the training steps, and the command's wall seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(procs), "-m", "vitkit", "train", "--recipe", str(RECIPE)]
    cmd += ["--max-steps", str(steps), "--quiet", "--out", str(out)]
    if shard:
        cmd.append("--shard")
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    last = (out / "metrics.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["images_per_second"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per run")
    parser.add_argument("--procs", type=int, default=2, help="processes to compare with 1")
    parser.add_argument("--shard", action="store_true", help="also time FSDP2 (--shard)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best one counts")
    args = parser.parse_args()

    n = args.procs
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, load average")
    print(f"{os.getloadavg()[0]:.2f}; {RECIPE.name}, {args.steps} steps, the recipe's batch")
    # (processes, threads each, sharded)
    rows = [(1, threads(n), False), (1, threads(1), False), (n, threads(n), False)]
    rows += [(n, threads(n), True)] if args.shard else []
    best: dict[tuple[int, int, bool], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for row in rows:
                ips, wall = run(*row, args.steps, Path(tmp) / f"{'-'.join(map(str, row))}-{r}")
                if ips > best.get(row, (0.0, 0.0))[0]:
                    best[row] = ips, wall
    share, whole = best[rows[0]][0], best[rows[1]][0]
    heads = ("processes", "threads", "mode", "images/s", "efficiency", "vs 1 proc", "wall s")
    print(" ".join(f"{h:>10}" for h in heads))
    for row in rows:
        procs, each, shard = row
        ips, wall = best[row]
        mode = "fsdp" if shard else ("ddp" if procs > 1 else "-")
        efficiency = f"{ips / (procs * share):.0%}" if procs > 1 else ""
        cells = (procs, each, mode, f"{ips:.0f}", efficiency, f"{ips / whole:.2f}x", f"{wall:.1f}")
        print(" ".join(f"{c:>10}" for c in cells))


if __name__ == "__main__":
    main()
