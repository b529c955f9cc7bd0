"""Accuracy against epochs and against minutes, for training runs side by side (each run's
metrics.jsonl): the curve the time-to-accuracy targets are read from.

    python bench/time_to_accuracy.py "hybrid 15 min, AdamW=src/vitkit/shipped/fashion-mnist" \\
        "Muon + kernels, seed 0=runs/levers/muon-kernels-e15-s0" --out docs/figures/tta.png

Minutes are each run's own (`elapsed_s`): runs compare only if they ran on the same kind of
machine, which the label should say. The table gives every run's validation accuracy at each
epoch's end, its final test accuracy where it has one (`--holdout` runs: evaluated once, at
the end) and its images per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from vitkit.plots import new_figure
from vitkit.rundir import METRICS_FILE


def read_run(path: Path) -> list[dict]:
    """The epoch-end lines of a run's metrics.jsonl."""
    lines = [json.loads(x) for x in (path / METRICS_FILE).read_text().splitlines() if x]
    return [m for m in lines if "val_acc" in m]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    p.add_argument("--out", type=Path, default=Path("time_to_accuracy.png"))
    p.add_argument("--floor", type=float, default=0.85, help="lowest accuracy shown")
    args = p.parse_args()

    fig = new_figure(figsize=(11, 4.2))
    by_epoch, by_time = fig.subplots(1, 2, sharey=True)
    print("| run | epochs | validation, last epoch | best | test (final weights) | img/s |")
    print("|---|---|---|---|---|---|")
    for spec in args.runs:
        label, _, directory = spec.rpartition("=")
        lines = read_run(Path(directory))
        epochs = [m["epoch"] for m in lines]
        minutes = [m["elapsed_s"] / 60 for m in lines]
        acc = [100 * m["val_acc"] for m in lines]
        by_epoch.plot(epochs, acc, marker=".", label=label)
        by_time.plot(minutes, acc, marker=".", label=label)
        test = lines[-1].get("test_acc")
        shown = f"{100 * test:.2f}%" if test is not None else "-"
        speed = statistics.mean(m["images_per_second"] for m in lines)
        print(
            f"| {label} | {epochs[-1]:g} | {acc[-1]:.2f}% | {max(acc):.2f}% | {shown} | "
            f"{speed:,.0f} |"
        )
    for ax, name in ((by_epoch, "epoch"), (by_time, "minutes of training")):
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=100 * args.floor)
    by_epoch.set_ylabel("validation top-1 (%)")
    by_time.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
