"""Evaluate a model on a labelled dataset: accuracy, per-class accuracy, confusion, loss."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitkit.data.dataset import ImageDataset
from vitkit.data.preprocess import preprocess
from vitkit.data.stream import ImageStream
from vitkit.model.vit import ViT
from vitkit.plots import plot_confusion
from vitkit.rundir import CONFUSION_FILE, REPORT_FILE
from vitkit.weights.format import atomic_write


@dataclass
class EvalReport:
    """Scores of one evaluation; `top5` is top-k accuracy with k = min(5, classes).

    `confusion[t][p]` counts images of true class t predicted as p; `per_class` is None for
    a class without images.
    """

    top1: float
    top5: float
    per_class: dict[str, float | None]
    confusion: list[list[int]]
    num_images: int
    loss: float
    images_per_second: float  # of images scored, each once whatever its number of views
    tta: list[str] = field(default_factory=list, kw_only=True)  # test-time augmentation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# A batch holds at most this many pixels an image-channel (64 images at 224 px): a batch of
# 256 at 224 px took some 1.7 GB more of activations and read-ahead than one of 64, for the
# same speed on a CPU; 28-pixel images still go 256 at a time.
MAX_BATCH_PIXELS = 64 * 224 * 224

# Test-time augmentations `evaluate` can average over (see `tta_views`).
TTA = ("flip", "shift")


def tta_views(images: torch.Tensor, tta: Sequence[str], shift: int) -> list[torch.Tensor]:
    """The views of a batch (N, C, H, W) whose predictions test-time augmentation averages:
    the images; with "shift" each also moved by `shift` pixels up, down, left and right, the
    uncovered edge zero-filled as training's `crop_padding` does; with "flip" every view
    also mirrored left to right. 1, 2, 5 or 10 views."""
    views = [images]
    if "shift" in tta:
        h, w = images.shape[-2:]
        padded = F.pad(images, (shift,) * 4)
        for dy, dx in ((-shift, 0), (shift, 0), (0, -shift), (0, shift)):
            views.append(padded[..., shift + dy : shift + dy + h, shift + dx : shift + dx + w])
    if "flip" in tta:
        views += [v.flip(-1) for v in views]
    return views


@torch.no_grad()
def evaluate(
    model: ViT | torch.nn.Module,
    dataset: ImageDataset | ImageStream,
    batch_size: int = 256,
    progress: bool = True,
    tta: Sequence[str] = (),
    tta_shift: int = 2,
) -> EvalReport:
    """Score `model` on every image of `dataset` (in memory, or streamed from files), on the
    device the model is on.

    Images are resized and their channels matched to the model's as needed. A model whose
    labels are the dataset's classes in another order is scored by name, not by index.
    Batches are `batch_size` images, fewer for large ones (`MAX_BATCH_PIXELS`). With `tta`,
    an image's class probabilities are the mean of its views' (`tta_views`), which costs a
    forward pass per view; the loss is then that of the mean probabilities.
    """
    _check(model, dataset, batch_size)
    if not set(tta) <= set(TTA) or tta_shift < 1:
        raise ValueError(f"tta takes {' and '.join(TTA)}, and tta_shift >= 1 pixel")
    batch_size = max(1, min(batch_size, MAX_BATCH_PIXELS // model.config.image_size**2))
    n = model.config.num_classes
    order = class_order(model.labels, dataset.classes)
    device, dtype = model.input_spec()
    k = min(5, n)
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    losses = []  # per-batch sums, added up in float64 at the end (no float64 on some devices)
    confusion = torch.zeros(n * n, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with tqdm(
            total=len(dataset),
            desc=f"eval {dataset.name}".strip(),
            unit="img",
            disable=not progress,
        ) as bar:
            for images, y in dataset_batches(dataset, batch_size):
                images = images.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                logits = _scores(model, images, dtype, tta, tta_shift)
                if order is not None:
                    logits = logits[:, order]
                losses.append(F.cross_entropy(logits, y, reduction="sum"))
                topk = logits.topk(k, dim=-1).indices
                correct1 += (topk[:, 0] == y).sum()
                correct5 += (topk == y[:, None]).any(dim=-1).sum()
                confusion += torch.bincount(y * n + topk[:, 0], minlength=n * n)
                bar.update(len(y))
        # Reading the totals waits for the device, so the clock stops after the last batch.
        counts = confusion.view(n, n).cpu()
        total1, total5 = correct1.item(), correct5.item()
        total_loss = torch.stack(losses).cpu().double().sum().item()
        elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    num = len(dataset)
    per_class_images = counts.sum(dim=1).tolist()
    hits = counts.diagonal().tolist()
    return EvalReport(
        top1=total1 / num,
        top5=total5 / num,
        per_class={
            name: (hit / images if images else None)
            for name, hit, images in zip(dataset.classes, hits, per_class_images, strict=True)
        },
        confusion=counts.tolist(),
        num_images=num,
        loss=total_loss / num,
        images_per_second=num / elapsed,
        tta=sorted(tta),
    )


def _scores(
    model: torch.nn.Module,
    images: torch.Tensor,
    dtype: torch.dtype,
    tta: Sequence[str],
    shift: int,
) -> torch.Tensor:
    """Logits, or with `tta` the log of the views' mean probabilities (which rank, and
    cross-entropy scores, as logits do)."""
    if not tta:
        return model(preprocess(images, model.config).to(dtype)).float()
    views = tta_views(images, tta, shift)
    probs = sum(model(preprocess(v, model.config).to(dtype)).float().softmax(dim=-1) for v in views)
    return (probs / len(views)).clamp_min(1e-12).log()


def dataset_batches(
    dataset: ImageDataset | ImageStream, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) of every image, in order."""
    if isinstance(dataset, ImageStream):
        yield from dataset.batches(0, range(len(dataset)), batch_size, drop_last=False)
        return
    for i in range(0, len(dataset), batch_size):
        yield dataset.images[i : i + batch_size], dataset.labels[i : i + batch_size]


def _check(model: torch.nn.Module, dataset: ImageDataset | ImageStream, batch_size: int) -> None:
    """Refuse a dataset the model cannot be scored on, saying why."""
    n = model.config.num_classes
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.name!r} has no images")
    if len(dataset.classes) != n:
        raise ValueError(
            f"dataset {dataset.name!r} has {len(dataset.classes)} classes, the model {n}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if dataset.labels.min() < 0 or dataset.labels.max() >= n:
        raise ValueError(f"dataset {dataset.name!r} has labels outside 0..{n - 1}")


def class_order(labels: list[str] | None, classes: list[str]) -> list[int] | None:
    """Model output columns in dataset class order, where both name the same classes
    differently ordered (a folder dataset sorts its classes; a model keeps its own order)."""
    if labels is None or labels == classes or len(set(labels)) != len(labels):
        return None
    if set(labels) != set(classes):
        return None
    return [labels.index(name) for name in classes]


def save_report(report: EvalReport, out_dir: str | Path, classes: list[str]) -> Path:
    """Write `eval.json` and `confusion.png` to `out_dir`; returns `out_dir`."""

    out_dir = Path(out_dir)
    atomic_write(out_dir / REPORT_FILE, json.dumps(report.to_dict(), indent=2) + "\n")
    title = f"top-1 {report.top1:.2%} on {report.num_images:,} images"
    plot_confusion(report.confusion, classes, out_dir / CONFUSION_FILE, title=title)
    return out_dir
