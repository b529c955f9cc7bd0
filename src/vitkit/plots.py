"""PNG figures: a confusion matrix, and loss/accuracy curves from a training metrics log.

Figures (here and in `vitkit.infer.explain`) are made by `new_figure`: matplotlib's object API,
saved through the Agg renderer, never pyplot, so no display is needed and a caller's
interactive backend is left alone. matplotlib is imported on the first figure, not with
vitkit: it takes about a second, which every command would otherwise pay.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitkit.rundir import ACCURACY_PLOT, LOSS_PLOT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The metrics the curves show; a log may hold others (lr, step, timing).
_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


def new_figure(**kwargs: Any) -> Figure:
    """A matplotlib Figure, not attached to pyplot (`kwargs` as `Figure` takes them)."""
    from matplotlib.figure import Figure  # heavy: imported on first use

    return Figure(**kwargs)


def plot_confusion(
    matrix: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) as a PNG.

    Colours are row-normalised, so each true class reads as where its images went; the
    counts are written in the cells while they still fit (up to 30 classes).
    """
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"a {n}-class confusion matrix must be {n}x{n}, got {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    side = min(4 + 0.5 * n, 24)  # inches: 9 for 10 classes, capped for 100
    font = min(10, max(4, 240 / n))
    fig = new_figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_xticks(range(n), labels=list(classes), rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels=list(classes), fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for t, p in zip(*np.nonzero(counts), strict=True):
            colour = "white" if fraction[t, p] > 0.5 else "black"
            ax.text(p, t, f"{counts[t, p]}", ha="center", va="center", fontsize=font, color=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_curves(metrics_jsonl_path: str | Path, out_dir: str | Path) -> list[Path]:
    """`loss.png` and `accuracy.png` (train and validation against epochs) from a metrics log.

    Each line of the log is a JSON object with an `epoch` and any of `train_loss`,
    `train_acc`, `val_loss`, `val_acc`; a metric missing from a line is simply not plotted.
    """
    records = _read_metrics(Path(metrics_jsonl_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, key, file in (("loss", "loss", LOSS_PLOT), ("accuracy", "acc", ACCURACY_PLOT)):
        fig = new_figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        # Training metrics usually come every few steps, validation once an epoch: a thin
        # line for the first, markers for the second.
        for split, style in (("train", {"lw": 1}), ("val", {"lw": 1.5, "marker": "o"})):
            points = [(r["epoch"], r[f"{split}_{key}"]) for r in records]
            points = sorted((e, v) for e, v in points if v is not None)
            if points:
                ax.plot(*zip(*points, strict=True), label=split, **style)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {name} logged", transform=ax.transAxes, ha="center")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        written.append(out_dir / file)
        fig.savefig(written[-1], dpi=110)
    return written


def _read_metrics(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), (int, float)):
            raise ValueError(f"{path}:{number}: expected a JSON object with a numeric epoch")
        records.append({k: record.get(k) for k in ("epoch", *_METRICS)})
    return records
