"""Training levers over seeds: each variant of a recipe trained for the same epochs with the
same held-out validation, reported as mean ± sd of validation and (final-weights) test
accuracy, with images/s and minutes, so that a lever is judged at equal epochs and at equal
time.

    python bench/levers.py --recipe recipes/fashion_mnist_hybrid_15min.toml --epochs 1 \\
        --variant adamw= --variant "muon=--optimizer muon" --seeds 0 1 2

Each run goes to OUT/VARIANT-sSEED; a run that already finished is read, not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from vitkit.runtime import cpu_name


def run(recipe: str, epochs: int, extra: list[str], seed: int, out: Path, threads: int) -> dict:
    """The last line of the run's metrics.jsonl (training it first unless it finished)."""
    metrics = out / "metrics.jsonl"
    if not (metrics.exists() and "test_acc" in metrics.read_text().splitlines()[-1]):
        cmd = ["vitkit", "train", "--recipe", recipe, "--epochs", str(epochs), "--seed", str(seed)]
        cmd += ["--holdout", "5000", "--quiet", "--out", str(out), *extra]
        print("$", shlex.join(cmd), flush=True)
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(metrics.read_text().splitlines()[-1])


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument(
        "--variant",
        action="append",
        required=True,
        metavar="NAME=ARGS",
        help="a name and the vitkit train arguments that make it (repeat)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=Path("runs/levers"))
    args = p.parse_args()

    print(f"{cpu_name()}, {args.threads} thread(s) a run; {args.recipe}, {args.epochs} epoch(s)")
    rows = []
    for variant in args.variant:
        name, _, extra = variant.partition("=")
        finals = [
            run(
                args.recipe,
                args.epochs,
                shlex.split(extra),
                seed,
                args.out / f"{name}-e{args.epochs}-s{seed}",
                args.threads,
            )
            for seed in args.seeds
        ]
        rows.append((name, extra, finals))
    print("\n| variant | arguments | validation | test (final weights) | img/s | minutes |")
    print("|---|---|---|---|---|---|")
    for name, extra, finals in rows:
        speed = statistics.mean(f["images_per_second"] for f in finals)
        minutes = statistics.mean(f["elapsed_s"] for f in finals) / 60
        print(
            f"| {name} | `{extra}` | {mean_sd([f['val_acc'] for f in finals])} | "
            f"{mean_sd([f['test_acc'] for f in finals])} | {speed:.0f} | {minutes:.1f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
