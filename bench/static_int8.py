"""Static int8 in ONNX Runtime against vitkit's dynamic int8: speed, then the accuracy guard.

    python bench/static_int8.py --guard runs/guard-s16 --limit 500

Static int8 calibrates every activation's scale once, so images could be batched without an
image's answer depending on its batch mates (vitkit's dynamic int8 runs one image a call for
that reason). Speed: S/16 with random weights, one process, batch 32, alternating rounds; the
files quantised as `vitkit.export` does (dynamic) and by `quantize_static` (QDQ and QOperator
formats, MatMul, Gemm and Conv, uint8 activations, int8 weights). Accuracy: the guard model
(`bench/guard_model.py`) on the first --limit Fashion-MNIST test images, each calibration
method with and without per-channel weight scales, against fp32: top-1, agreement of top-1
labels, mean and largest absolute difference of the class probabilities.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

import vitkit
from vitkit.data import load_dataset
from vitkit.data.preprocess import preprocess
from vitkit.export.onnx import export_onnx, onnx_session, quantize_onnx_int8
from vitkit.infer.optimize import CALIBRATION_IMAGES
from vitkit.runtime import cpu_name


class Batches(CalibrationDataReader):
    """Calibration images, 8 a call, for `quantize_static`."""

    def __init__(self, name: str, images: np.ndarray) -> None:
        self.name, self.batches = name, iter(np.array_split(images, max(1, len(images) // 8)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch}


def quantised(
    fp32: Path, calibration: np.ndarray, methods: list[str], formats: list[str]
) -> Iterator[tuple[str, Path]]:
    """The dynamic file, then a static one per (format, method, per-channel)."""
    yield "dynamic", quantize_onnx_int8(fp32, fp32.with_name("dynamic.onnx"))
    name = onnx_session(fp32).get_inputs()[0].name
    prepared = fp32.with_name("prepared.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    for fmt in formats:
        for method in methods:
            for per_channel in (False, True):
                label = f"static {fmt} {method}{' per-channel' if per_channel else ''}"
                out = fp32.with_name(label.replace(" ", "-") + ".onnx")
                quantize_static(
                    str(prepared),
                    str(out),
                    Batches(name, calibration),
                    quant_format=getattr(QuantFormat, fmt),
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method),
                    per_channel=per_channel,
                )
                yield label, out


def speed(tmp: Path, batch: int, rounds: int) -> None:
    model = vitkit.create_model("S/16", num_classes=10, seed=0).eval()
    fp32 = export_onnx(model, tmp / "s16.onnx", dynamic_batch=True)
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((16, 3, 224, 224), dtype=np.float32)
    files = {"fp32": fp32, **dict(quantised(fp32, calibration, ["MinMax"], ["QDQ", "QOperator"]))}
    sessions = {k: onnx_session(f) for k, f in files.items() if "per-channel" not in k}
    name = sessions["fp32"].get_inputs()[0].name
    x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
    modes = [(k, per_image) for k in sessions for per_image in (False, True) if k != "fp32"]
    modes.insert(0, ("fp32", False))

    def run(key: str, per_image: bool) -> None:
        for chunk in np.split(x, batch) if per_image else [x]:
            sessions[key].run(None, {name: chunk})

    best = dict.fromkeys(modes, float("inf"))
    for mode in modes:
        run(*mode)  # warm-up
    for _ in range(rounds):
        for mode in modes:
            start = time.perf_counter()
            run(*mode)
            best[mode] = min(best[mode], time.perf_counter() - start)
    print(f"S/16, random weights, batch {batch}, best of {rounds} alternating rounds (img/s):")
    for (key, per_image), seconds in best.items():
        how = "one image a call" if per_image else f"{batch} a call"
        print(f"  {key:32} {how:18} {batch / seconds:7.2f}")


def guard(tmp: Path, directory: str, limit: int, methods: list[str]) -> None:
    model = vitkit.load_model(directory)
    c = model.config
    if model.calibration is None:
        raise SystemExit(f"{directory}: no calibration images")
    test = load_dataset("fashion-mnist", "test", channels=c.in_channels)
    test = test.subset(torch.arange(min(limit, len(test))))
    x = preprocess(test.images, c).numpy()
    calibration = preprocess(model.calibration[:CALIBRATION_IMAGES], c).numpy()
    fp32 = export_onnx(model, tmp / "guard.onnx", dynamic_batch=True)
    files = {"fp32": fp32, **dict(quantised(fp32, calibration, methods, ["QDQ"]))}
    print(f"{directory}: first {len(x)} test images, {len(calibration)} calibration images")
    print(f"  {'int8':40} {'top-1':>7} {'agree':>8} {'mean|dp|':>9} {'max|dp|':>8}")
    reference = None
    for key, path in files.items():
        session = onnx_session(path)
        name = session.get_inputs()[0].name
        chunks = np.array_split(x, max(1, len(x) // 20))
        logits = np.concatenate([session.run(None, {name: chunk})[0] for chunk in chunks])
        probs = torch.from_numpy(logits).softmax(1)
        reference = probs if reference is None else reference
        top1 = (probs.argmax(1) == test.labels).float().mean().item() * 100
        agree = (probs.argmax(1) == reference.argmax(1)).float().mean().item() * 100
        diff = (probs - reference).abs()
        print(
            f"  {key:40} {top1:6.2f}% {agree:7.2f}% {diff.mean():9.5f} {diff.max():8.4f}",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--guard", help="a trained model directory (bench/guard_model.py)")
    p.add_argument("--limit", type=int, default=500, help="test images for the guard")
    p.add_argument("--methods", nargs="+", default=["MinMax", "Percentile", "Entropy"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        speed(Path(tmp), args.batch, args.rounds)
        if args.guard:
            guard(Path(tmp), args.guard, args.limit, args.methods)


if __name__ == "__main__":
    main()
