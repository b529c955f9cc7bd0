"""`vitkit bench`: speed against timm and Hugging Face, in one process, as ratios (the
measuring is in `vitkit.benchmark`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from vitkit.benchmark import (
    TIMM_NAMES,
    TRAIN_BATCH,
    Result,
    bench_inference,
    bench_training,
    int8_kernel,
    int8_matmul_peak,
    machine,
    matmul_peak,
    missing_peers,
    ort_int8_matmul_peak,
    report,
)
from vitkit.cli.common import fail
from vitkit.runtime import fast_precisions, int8_backend


def add_bench_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="speed against timm and Hugging Face, in one process, as ratios"
    )
    p.add_argument("--models", nargs="+", default=list(TIMM_NAMES), help="presets for inference")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 32], help="inference batches")
    p.add_argument(
        "--train",
        nargs="*",
        default=None,
        metavar="PRESET",
        help=f"also time training steps (default presets: {', '.join(TRAIN_BATCH)})",
    )
    p.add_argument(
        "--train-batch", type=int, metavar="N", help="training batch (default: per preset)"
    )
    p.add_argument("--no-infer", action="store_true", help="training only")
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also vitkit's compiled fp32 (and bf16 where fast) packages, as `vitkit serve` "
        "runs them (built once into the cache: minutes the first time)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but PyTorch sees no CUDA GPU here")
    missing = missing_peers()
    if missing:  # checked before the minutes of measuring that would end in a bare table
        return fail(
            "bench",
            f"{', '.join(missing)} not installed; the peers it compares with come with "
            "pip install 'vitkit[bench]'",
        )
    where = machine(device)
    fast = fast_precisions(device)
    peaks, kernel = _peaks(device, fast)
    shown = [f"fp32 {peaks['fp32']:.3f} TFLOP/s"]
    shown.append(f"bf16 {peaks['bf16']:.3f} TFLOP/s" if "bf16" in peaks else "bf16 not native")
    if kernel:
        shown.append(f"int8 {peaks['int8']:.3f} TOPS ({kernel})")
    print(
        f"{where}\nmatmul peaks: {', '.join(shown)}; fast modes here: {', '.join(fast) or 'none'}",
        flush=True,
    )
    results: list[Result] = []
    if not args.no_infer:
        for preset in args.models:
            for batch in args.batch:
                print(f"inference {preset} batch {batch}...", flush=True)
                with _quiet():
                    results += bench_inference(preset, batch, args.rounds, device, args.compiled)
    train = list(TRAIN_BATCH) if args.train == [] else args.train or []
    for preset in train:
        print(f"training {preset}...", flush=True)
        with _quiet():
            results += bench_training(preset, args.rounds, device, args.train_batch)
    # Measured again at the end, the higher kept: a CPU shared with other work, or slow to
    # reach its clock, shows a lower peak in one of the two.
    again, _ = _peaks(device, fast)
    peaks = {k: max(v, again[k]) for k, v in peaks.items()}
    print(f"matmul peaks, the higher of start and end: {_shown(peaks)}")
    print(report(results, peaks))
    if args.json:
        payload = {
            "machine": where,
            "peaks": peaks,
            "int8_kernel": kernel,
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


def _peaks(device: torch.device, fast: list[str]) -> tuple[dict[str, float], str | None]:
    """The matmul peaks of each precision timed here, and the int8 kernel's description."""
    peaks = {"fp32": matmul_peak(torch.float32, device)}
    # Without native bf16 a CPU computes it in a slow fallback (minutes for the probe), and
    # nothing is timed in bf16 there.
    if "bf16" in fast or device.type == "cuda":
        peaks["bf16"] = matmul_peak(torch.bfloat16, device)
    if device.type != "cpu":  # vitkit's int8 runs on CPUs only
        return peaks, None
    onednn, kernel = int8_matmul_peak(), f"oneDNN: {int8_kernel()}"
    if int8_backend() == "onnxruntime":  # vitkit's int8 runs in ONNX Runtime here
        peaks["int8"] = ort_int8_matmul_peak()
        return peaks, f"ONNX Runtime's MatMulInteger; {kernel}, {onednn:.3f} TOPS"
    peaks["int8"] = onednn
    return peaks, kernel


def _shown(peaks: dict[str, float]) -> str:
    units = {"int8": "TOPS"}
    return ", ".join(f"{k} {v:.3f} {units.get(k, 'TFLOP/s')}" for k, v in peaks.items())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Compilers' and converters' warnings are not results."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
