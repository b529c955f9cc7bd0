"""Accuracy and speed of each inference mode on held-out images, side by side with fp32.

    python bench/precision_accuracy.py                       # the shipped model, Fashion-MNIST
    python bench/precision_accuracy.py runs/x --data digits
    python bench/precision_accuracy.py runs/guard-s16 --limit 500 --compiled

Prints, per mode: top-1, its difference from fp32 in points, agreement of top-1 labels with
fp32, the mean and largest absolute difference of the class probabilities from fp32's,
images/s over the images (batch --batch-size) and the time spent preparing the mode
(calibration, quantisation, export, compilation). The modes are those `vitkit.optimize` runs
fast on this CPU (int8 through oneDNN or ONNX Runtime, whichever this CPU's int8 uses), and
with --compiled also every package `vitkit serve` may build here (`vitkit optimize`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import vitkit
from vitkit.data import load_dataset
from vitkit.data.preprocess import preprocess
from vitkit.infer.compiled import auto_candidates, build_compiled
from vitkit.infer.optimize import fast_precisions, optimize
from vitkit.model.vit import ViT

Run = Callable[[torch.Tensor], torch.Tensor]


def modes(model: ViT, compiled: bool, max_batch: int) -> Iterator[tuple[str, Run, float]]:
    """(name, run, seconds to prepare) for fp32 and every fast mode."""
    for precision in ["fp32", *reversed(fast_precisions())]:
        start = time.perf_counter()
        fast = optimize(model, precision)
        name = f"{precision}-onnxruntime" if fast.backend == "onnxruntime" else precision
        yield name, fast, time.perf_counter() - start
    if not compiled:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for variant in dict.fromkeys(["fp32", *auto_candidates(model)]):
            start = time.perf_counter()
            package = build_compiled(model, variant, max_batch, Path(tmp), lambda _: None)
            assert package.run is not None
            yield f"compiled-{variant}", package.run, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="fashion-mnist")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, help="only the first N test images")
    p.add_argument("--compiled", action="store_true", help="also the compiled packages")
    args = p.parse_args()

    model = vitkit.load_model(args.model)
    c = model.config
    test = load_dataset(args.data, "test", channels=c.in_channels)
    if args.limit:
        test = test.subset(torch.arange(min(args.limit, len(test))))
    x = preprocess(test.images, c)  # resized to the model's input here
    threads = torch.get_num_threads()
    print(
        f"{args.model} on {test.name} test ({len(test)} images, {c.image_size} px), "
        f"{threads} threads"
    )
    print(
        f"{'mode':24} {'top-1':>8} {'vs fp32':>8} {'agree':>8} {'mean|dp|':>9} {'max|dp|':>8} "
        f"{'img/s':>7} {'prepare':>8}"
    )
    reference = None
    for name, run, prepare in modes(model, args.compiled, args.batch_size):
        start = time.perf_counter()
        for size in {args.batch_size, len(x) % args.batch_size or args.batch_size}:
            run(x[:size])  # compile for the batch sizes below before timing
        prepare += time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode():
            probs = torch.cat([run(chunk).float().softmax(1) for chunk in x.split(args.batch_size)])
        speed = len(x) / (time.perf_counter() - start)
        if reference is None:
            reference = probs
        preds, ref = probs.argmax(1), reference.argmax(1)
        acc = (preds == test.labels).float().mean().item() * 100
        ref_acc = (ref == test.labels).float().mean().item() * 100
        agree = (preds == ref).float().mean().item() * 100
        diff = (probs - reference).abs()
        print(
            f"{name:24} {acc:7.2f}% {acc - ref_acc:+7.2f}  {agree:7.2f}% {diff.mean():9.5f} "
            f"{diff.max():8.4f} {speed:7.1f} {prepare:7.1f}s",
            flush=True,
        )
    top = reference.max(1).values
    print(f"fp32's top probability: mean {top.mean():.3f}, median {top.median():.3f}")


if __name__ == "__main__":
    main()
