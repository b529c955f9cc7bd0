"""Accuracy, logit drift, speed and size of one model run several ways: PyTorch fp32 and bf16
autocast, ONNX fp32 (the exporter's default opset, and 23 with its fused Attention op) and
ONNX int8 (per-tensor and per-channel weights). Prints a Markdown table.

    .venv/bin/python bench/export_accuracy.py                    # the shipped model
    .venv/bin/python bench/export_accuracy.py --model runs/fm --limit 2000

Top-1 is on the whole test split unless --limit; drift is the largest |logit - fp32 logit|
over every image and class. Latency is the median of single-image calls, throughput the
median of batches of 64 real images, each variant timed in blocks of calls, in turns; PyTorch
and onnxruntime get the same thread count.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import vitkit
from vitkit.data import load_dataset
from vitkit.data.preprocess import preprocess
from vitkit.export.onnx import (
    compare_precisions,
    export_onnx,
    onnx_session,
    quantize_onnx_int8,
    run_onnx,
)
from vitkit.rundir import WEIGHTS_FILE
from vitkit.weights.format import resolve_model_dir


def median_seconds(
    fns: dict[str, Callable[[], object]], calls: int, rounds: int = 3
) -> dict[str, float]:
    """Median seconds per call of each function. Each round runs every function for a block of
    calls, so a load that comes and goes (the machine is shared) slows all of them alike;
    within a block one runtime has the cores, as it would in use (onnxruntime's threads spin
    for a while after each run and would slow PyTorch calls placed between them)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(5):  # warm-up, and the previous block's threads wind down
                fn()
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fashion-mnist", help="model directory or name")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--limit", type=int, help="score only the first N test images")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = vitkit.load_model(args.model)
    c = model.config
    test = load_dataset(args.data, "test", image_size=c.image_size, channels=c.in_channels)
    if args.limit:
        test = test.subset(torch.arange(min(args.limit, len(test))))
    weights = resolve_model_dir(args.model) / WEIGHTS_FILE

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "model.onnx", dynamic_batch=True)
        files = {
            "ONNX fp32": fp32,
            "ONNX fp32, opset 23": export_onnx(
                model, Path(tmp) / "model23.onnx", dynamic_batch=True, opset=23
            ),
            "ONNX int8": quantize_onnx_int8(fp32, Path(tmp) / "model.int8.onnx"),
            "ONNX int8 per-channel": quantize_onnx_int8(
                fp32, Path(tmp) / "model.int8pc.onnx", per_channel=True
            ),
        }
        scores = compare_precisions(model, test, files)

        def bf16(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)

        runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "PyTorch fp32": model,
            "PyTorch bf16": bf16,
        }
        for name, path in files.items():
            runners[name] = partial(run_onnx, onnx_session(path, args.threads))
        sizes = {name: path.stat().st_size for name, path in files.items()}
        sizes["PyTorch fp32"] = sizes["PyTorch bf16"] = weights.stat().st_size

        batch = preprocess(test.images[:64], c)
        one = batch[:1]
        print(
            f"{args.model} on {len(test):,} {test.name} test images, {args.threads} thread(s), "
            f"torch {torch.__version__}\n"
        )
        print(
            "| variant | top-1 | max abs logit diff vs fp32 | same top-1 as fp32 "
            "| ms/image, batch 1 | images/s, batch 64 | file |"
        )
        print("|---|---|---|---|---|---|---|")
        with torch.inference_mode():
            latency = median_seconds({k: partial(run, one) for k, run in runners.items()}, 100)
            per_batch = median_seconds({k: partial(run, batch) for k, run in runners.items()}, 10)
        for s in scores:
            print(
                f"| {s.name} | {s.top1:.2%} | {s.max_abs_diff:.2e} | {s.top1_agreement:.2%} "
                f"| {latency[s.name] * 1e3:.2f} | {len(batch) / per_batch[s.name]:,.0f} "
                f"| {sizes[s.name] / 1e6:.2f} MB |"
            )


if __name__ == "__main__":
    main()
