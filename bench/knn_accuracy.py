"""k-NN classification with the shipped Fashion-MNIST model's features, beside its linear head.

    .venv/bin/python bench/knn_accuracy.py                 # the full protocol (CPU: minutes)
    .venv/bin/python bench/knn_accuracy.py --limit 3000    # a quick look at fewer images

DINO's weighted k-NN (`vitkit.infer.knn`) on the L2-normalised pooled features: k and the
temperature T are chosen on a held-out 10% of the training set (stratified; the other 90% is
the bank), never on the test set; then the test set is scored with the chosen k and T against
the bank of every training image. Prints the validation grid, the test top-1 and top-5 of
k-NN (with the chosen k and T; with DINO's k=20, T=0.07, for reference only) and of the
model's own head, the CPU and the time each step took.
"""

from __future__ import annotations

import argparse
import time

import torch

from vitkit import evaluate, load_model
from vitkit.data import ImageDataset, load_dataset, stratified_split
from vitkit.infer.embed import embed_dataset
from vitkit.infer.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_scores, nearest, vote
from vitkit.runtime import cpu_name

GRID_K = (10, 20, 50)
GRID_T = (0.03, 0.07, 0.2)
VAL_FRACTION = 0.1


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return (scores.argmax(dim=1) == labels).float().mean().item()


def top5(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return (scores.topk(5, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()


def first(ds: ImageDataset, n: int | None) -> ImageDataset:
    return ds if n is None else ds.subset(torch.arange(min(n, len(ds))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="only the first N images of each split")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    model = load_model("fashion-mnist")
    c = model.config
    splits = {
        split: first(
            load_dataset("fashion-mnist", split, image_size=c.image_size, channels=c.in_channels),
            args.limit,
        )
        for split in ("train", "test")
    }
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads")

    start = time.perf_counter()
    train, train_labels = embed_dataset(model, splits["train"], args.batch_size)
    embed_train_s = time.perf_counter() - start

    # Validation: one neighbour search at the largest k serves every k (neighbours come sorted).
    kept, held = stratified_split(train_labels, VAL_FRACTION, seed=0)
    sims, indices = nearest(train[kept], train[held], max(GRID_K))
    neighbour_labels = train_labels[kept][indices]
    n = len(splits["train"].classes)
    print(f"\nvalidation: {len(held):,} training images against a bank of the other {len(kept):,}")
    print(f"{'k':>4}  " + "  ".join(f"T={t:<6}" for t in GRID_T))
    grid = {}
    for k in GRID_K:
        for t in GRID_T:
            scores = vote(sims[:, :k], neighbour_labels[:, :k], n, t)
            grid[k, t] = top1(scores, train_labels[held])
        print(f"{k:>4}  " + "  ".join(f"{grid[k, t]:<8.2%}" for t in GRID_T))
    k, t = max(grid, key=grid.get)  # the first best, in grid order
    print(f"chosen: k={k}, T={t}")

    start = time.perf_counter()
    test, test_labels = embed_dataset(model, splits["test"], args.batch_size)
    embed_test_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = knn_scores(train, train_labels, test, n, k, t)
    knn_s = time.perf_counter() - start
    # DINO's defaults too (`vitkit eval --knn` without --k, --temperature), for reference only.
    default = knn_scores(train, train_labels, test, n, DEFAULT_K, DEFAULT_TEMPERATURE)
    start = time.perf_counter()
    head = evaluate(model, splits["test"], args.batch_size)
    head_s = time.perf_counter() - start

    print(f"\ntest: {len(test):,} images, bank of {len(train):,} training images")
    print(f"{'classifier':<28}  {'top-1':>7}  {'top-5':>7}")
    for name, s in (
        (f"k-NN (k={k}, T={t})", scores),
        (f"k-NN (k={DEFAULT_K}, T={DEFAULT_TEMPERATURE}), default", default),
    ):
        print(f"{name:<28}  {top1(s, test_labels):>7.2%}  {top5(s, test_labels):>7.2%}")
    print(f"{'linear head':<28}  {head.top1:>7.2%}  {head.top5:>7.2%}")
    print(
        f"\ntime: embedding {len(train):,} training images {embed_train_s:.0f} s, "
        f"{len(test):,} test images {embed_test_s:.0f} s; k-NN on the test set {knn_s:.1f} s; "
        f"the head's evaluation {head_s:.0f} s"
    )


if __name__ == "__main__":
    main()
