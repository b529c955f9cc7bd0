"""Accuracy and speed of each inference precision on a test set, side by side with fp32.

    python bench/precision_accuracy.py                       # the shipped model, Fashion-MNIST
    python bench/precision_accuracy.py runs/x --data digits

Prints, per mode: top-1, its difference from fp32 in points, agreement of top-1 labels with
fp32, images/s over the whole test set (batch 256) and the time spent preparing the mode
(int8: calibration, quantisation, compilation).
"""

from __future__ import annotations

import argparse
import time

import torch

import vitkit
from vitkit.data import load_dataset
from vitkit.data.preprocess import preprocess
from vitkit.infer.optimize import fast_precisions, optimize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="fashion-mnist")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()

    model = vitkit.load_model(args.model)
    test = load_dataset(args.data, "test", image_size=model.config.image_size)
    x = preprocess(test.images, model.config)
    modes = ["fp32", *reversed(fast_precisions())]
    threads = torch.get_num_threads()
    print(f"{args.model} on {test.name} test ({len(test)} images), {threads} threads")
    print(f"{'mode':6} {'top-1':>8} {'vs fp32':>8} {'agree':>8} {'img/s':>8} {'prepare':>8}")
    reference = None
    for mode in modes:
        start = time.perf_counter()
        fast = optimize(model, mode)
        for size in {args.batch_size, len(x) % args.batch_size or args.batch_size}:
            fast(x[:size])  # compile for the batch sizes below before timing
        prepare = time.perf_counter() - start
        start = time.perf_counter()
        preds = torch.cat([fast(chunk).argmax(1) for chunk in x.split(args.batch_size)])
        speed = len(x) / (time.perf_counter() - start)
        acc = (preds == test.labels).float().mean().item() * 100
        if reference is None:
            reference, fp32_acc = preds, acc
        agree = (preds == reference).float().mean().item() * 100
        print(
            f"{mode:6} {acc:7.2f}% {acc - fp32_acc:+7.2f}  {agree:7.2f}% {speed:8.0f} "
            f"{prepare:7.1f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
