"""vitkit against timm and Hugging Face in one process, on the same weights (`vitkit bench`).

Every implementation runs the same architecture with the same (converted) weights, batch,
resolution and precision; runs alternate between implementations, so that a machine that
speeds up or slows down affects all of them alike, and the median of the rounds is kept.
The machine's fp32, bf16 and int8 matmul peaks are measured in the same run (int8 through the
kernels vitkit's int8 calls here: oneDNN's quantised linear, whose kernel and ISA are reported,
on CPUs with VNNI or AMX; ONNX Runtime's integer matmul on CPUs with AVX2 only), and each
result is also a fraction of the peak of its own precision (on a GPU, the bf16 fraction of a
training step is its model FLOPs utilisation, MFU). The peers (timm, which needs
torchvision, and transformers) are no dependencies of vitkit: `pip install 'vitkit[bench]'`
adds them, and only the functions that build a peer import it.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.config import get_preset
from vitkit.data.preprocess import preprocess
from vitkit.export import export_onnx, onnx_session, quantize_onnx_int8
from vitkit.infer.compiled import build_compiled, cache_dir, private_dir
from vitkit.infer.optimize import optimize
from vitkit.model.factory import create_model
from vitkit.model.vit import ViT, flops
from vitkit.runtime import auto_bf16, cpu_flags, cpu_name, fast_precisions
from vitkit.weights.format import CheckpointError, one_line
from vitkit.weights.hf import to_hf
from vitkit.weights.timm import to_timm

# The packages the peers need, as `pip install 'vitkit[bench]'` installs them.
PEER_PACKAGES = ("timm", "torchvision", "transformers")
# Every implementation compared with vitkit, in the report's order: PyTorch peers, then the
# CPU runtimes (which run the model's ONNX file; measured where installed).
PEERS = ("timm", "hf", "ort", "openvino")

# vitkit preset -> timm model name (the same architecture).
TIMM_NAMES = {
    "Ti/16": "vit_tiny_patch16_224",
    "S/16": "vit_small_patch16_224",
    "B/16": "vit_base_patch16_224",
}
# Families timed against timm's own model of the same architecture (`--models` takes them):
# DINOv2's layer scale at 518 px, OpenAI CLIP's image tower (norm before the blocks, QuickGELU).
TIMM_FAMILY_NAMES = {
    "DINOv2-S/14": "vit_small_patch14_dinov2",
    "CLIP-B/16": "vit_base_patch16_clip_quickgelu_224",
}
# Training presets timed by default (the Fashion-MNIST preset and S/16) and their batches;
# other presets train at batch 32 unless --train-batch says otherwise.
TRAIN_BATCH = {"Ti/7@28": 256, "S/16": 32}


@dataclass
class Result:
    task: str  # "infer" or "train"
    model: str
    batch: int
    impl: str  # vitkit, timm, hf
    mode: str  # e.g. fp32, bf16-autocast, bf16-compiled, int8
    seconds: float  # median seconds per batch (inference) or per step (training)
    images_per_second: float
    tflops: float
    setup_seconds: float  # conversion, quantisation and compilation before the first run


# -- the machine ----------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Best TFLOP/s of a square matmul in `dtype` on `device` (all of a CPU's threads)."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = min(_seconds(lambda: a @ b, device) for _ in range(repeats))
    return 2 * size**3 / best / 1e12


def ort_int8_matmul_peak(repeats: int = 5) -> float:
    """Best TOPS of a square int8 matmul in ONNX Runtime (`MatMulInteger`, u8 activations by s8
    weights held as a constant, int32 out): the kernel its dynamic int8 models run."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    size = 2048
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (size, size), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
        "int8_peak",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])],
        [numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8_peak.onnx"
        onnx.save(proto, path)
        session = onnx_session(path)
    feed = {"x": rng.integers(0, 256, (size, size), dtype=np.uint8)}
    session.run(None, feed)
    best = min(
        _seconds(lambda: session.run(None, feed), torch.device("cpu")) for _ in range(repeats)
    )
    return 2 * size**3 / best / 1e12


def int8_matmul_peak(repeats: int = 5) -> float:
    """Best TOPS of a square int8 matmul through oneDNN's quantised linear (u8 activations,
    s8 per-channel weights, prepacked, fp32 out): the kernel vitkit's int8 models call."""
    size = 2048
    gen = torch.Generator().manual_seed(0)
    qx = torch.randint(0, 256, (size, size), dtype=torch.uint8, generator=gen)
    weight = torch.randint(-127, 128, (size, size), dtype=torch.int8, generator=gen)
    packed = torch.ops.onednn.qlinear_prepack(weight, [size, size])
    scales, zeros = torch.full((size,), 0.01), torch.zeros(size, dtype=torch.int64)

    def run() -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(
            qx, 0.02, 128, packed, scales, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )

    run()
    best = min(_seconds(run, torch.device("cpu")) for _ in range(repeats))
    return 2 * size**3 / best / 1e12


# One int8 linear layer, run with oneDNN's verbose log on (in a child process: the log is
# written by C++ to the process's stdout).
_INT8_PROBE = """
import torch
qx = torch.randint(0, 256, (64, 256), dtype=torch.uint8)
packed = torch.ops.onednn.qlinear_prepack(torch.ones(256, 256, dtype=torch.int8), [64, 256])
torch.ops.onednn.qlinear_pointwise(qx, 0.02, 128, packed, torch.full((256,), 0.01),
    torch.zeros(256, dtype=torch.int64), None, 1.0, 0, torch.float32, "none", [], "")
"""


def int8_kernel() -> str:
    """The ISA oneDNN runs here and the implementation its int8 matmul picks, e.g.
    "Intel AVX2; gemm:jit" or "...AMX...; brg_matmul:avx512_core_amx"."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    try:
        out = subprocess.run(
            [sys.executable, "-c", _INT8_PROBE], env=env, capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    isa = re.search(r"isa:([^,\n]+)", out)
    impl = re.search(r"primitive,exec,cpu,matmul,([^,]+)", out)
    return f"{isa.group(1) if isa else 'unknown ISA'}; {impl.group(1) if impl else 'unknown'}"


def machine(device: torch.device) -> str:
    """The processor benchmarked and the features that decide its fast paths."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    features = [
        f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni") if f in cpu_flags()
    ]
    amx = "AMX (bf16, int8)" if {"amx_bf16", "amx_int8"} <= cpu_flags() else "no AMX"
    shown = ", ".join(features) or "no AVX-512, no VNNI"
    return f"{cpu_name()}, {torch.get_num_threads()} threads, {amx}, {shown}"


def peak_of(mode: str) -> str:
    """The precision whose peak a mode is measured against: int8, bf16 or fp32."""
    return "int8" if mode.startswith("int8") else "bf16" if mode.startswith("bf16") else "fp32"


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of `fn()`, waiting for a GPU's queued work before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# -- peers ----------------------------------------------------------------------------------
def missing_peers() -> list[str]:
    """The peers' packages that are not installed here (found without importing them)."""
    return [name for name in PEER_PACKAGES if importlib.util.find_spec(name) is None]


_torchvision_ops: torch.library.Library | None = None


def declare_torchvision_ops() -> None:
    """Make torchvision importable (timm needs it, and so do parts of transformers): PyPI's
    torchvision is a CUDA build whose compiled ops can't load beside the CPU torch wheel, but
    importing it only needs their schemas, and no ViT uses those ops. Declares them where
    torchvision's own library can't load."""
    global _torchvision_ops
    if _torchvision_ops is None and not _torchvision_ops_load():
        _torchvision_ops = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _torchvision_ops.define(
                f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
            )


def import_timm() -> Any:
    """timm, with torchvision made importable first (`declare_torchvision_ops`)."""
    declare_torchvision_ops()
    import timm  # an optional peer (vitkit[bench]), imported only when it is measured

    return timm


def _torchvision_ops_load() -> bool:
    """Whether torchvision's compiled ops are defined, or load (False: they can't)."""
    try:
        torch.ops.torchvision.nms  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        pass
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: importing timm fails plainly
    for library in Path(spec.submodule_search_locations[0]).glob("_C.*"):
        try:
            torch.ops.load_library(str(library))
            return True
        except OSError:
            return False
    return False


def timm_model(model: ViT, name: str | None = None) -> nn.Module:
    """timm's model with `model`'s weights: the architecture `name` (a family's), else
    timm's plain VisionTransformer of the same shape."""
    c = model.config
    if name is not None:
        net = import_timm().create_model(
            name, pretrained=False, num_classes=c.num_classes, img_size=c.image_size, depth=c.depth
        )
        net.load_state_dict(to_timm(model))
        return net
    net = import_timm().models.VisionTransformer(
        img_size=c.image_size,
        patch_size=c.patch_size,
        in_chans=c.in_channels,
        num_classes=c.num_classes,
        embed_dim=c.width,
        depth=c.depth,
        num_heads=c.heads,
        mlp_ratio=c.mlp_dim / c.width,
    )
    net.load_state_dict(to_timm(model))
    return net


def hf_model(model: ViT) -> nn.Module:
    # An optional peer (vitkit[bench]), imported only when it is measured.
    from transformers import ViTForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        to_hf(model, tmp)
        net = ViTForImageClassification.from_pretrained(tmp, attn_implementation="sdpa")
    return _Logits(net)


class _Logits(nn.Module):
    """A Hugging Face model that returns the logits tensor, like the others."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


def peers(model: ViT, timm_name: str | None = None) -> dict[str, nn.Module]:
    """The peer implementations installed here, each with `model`'s weights, on its device
    (`timm_name`: timm's architecture for a family's model; Hugging Face's ViT takes plain
    ViTs only)."""
    device = next(model.parameters()).device
    # The converters read and write weights on the CPU.
    source = model if device.type == "cpu" else copy.deepcopy(model).cpu()
    builders = {"timm": lambda m: timm_model(m, timm_name), "hf": hf_model}
    out = {}
    for name, build in builders.items():
        try:
            out[name] = build(source).eval().to(device)
        except (ImportError, CheckpointError) as e:
            print(f"  ({name} skipped: {one_line(str(e))[:120]})")
    return out


# -- inference ------------------------------------------------------------------------------
def inference_modes(
    model: ViT, batch: int, compiled: bool = False, timm_name: str | None = None
) -> Iterator[tuple[str, str, Callable, float]]:
    """(impl, mode, fn, setup seconds) for every implementation and precision measured, on
    the device `model` lives on. On a GPU, vitkit's bf16 is also measured compiled; on a CPU,
    with `compiled`, its fp32 and bf16 (where fast) as the AOTInductor packages `vitkit
    serve` runs (built once into vitkit's cache; the build is the set-up time). vitkit's
    int8 on a CPU without VNNI runs in ONNX Runtime ("int8-onnxruntime")."""
    model = model.eval()
    device = next(model.parameters()).device
    fast = fast_precisions(device)
    yield "vitkit", "fp32", optimize(model, "fp32"), 0.0
    if compiled and device.type == "cpu":
        for mode in ("fp32", *(["bf16"] if "bf16" in fast else [])):
            start = time.perf_counter()
            package = build_compiled(model, mode, batch, private_dir(cache_dir()), lambda _: None)
            assert package.run is not None
            yield "vitkit", f"{mode}-compiled", package.run, time.perf_counter() - start
    for mode in ("bf16", "int8"):
        if mode not in fast:
            continue
        start = time.perf_counter()
        net = optimize(model, mode, calibration=_calibration(model))
        shown = f"{mode}-onnxruntime" if net.backend == "onnxruntime" else mode
        yield "vitkit", shown, net, time.perf_counter() - start
        if mode == "bf16" and device.type == "cuda":
            yield "vitkit", "bf16-compiled", _compiled(net.net), 0.0
    if device.type == "cpu":
        yield from runtime_modes(model)
    for impl, net in peers(model, timm_name).items():
        yield impl, "fp32", net, 0.0
        if "bf16" not in fast:
            continue

        def autocast(x: torch.Tensor, net: nn.Module = net) -> torch.Tensor:
            with torch.autocast(device.type, torch.bfloat16):
                return net(x)

        yield impl, "bf16-autocast", autocast, 0.0
        yield impl, "bf16-compiled", _compiled(copy.deepcopy(net).to(torch.bfloat16)), 0.0


def runtime_modes(model: ViT) -> Iterator[tuple[str, str, Callable, float]]:
    """The CPU runtimes on the model's ONNX file (any batch): ONNX Runtime in fp32 and with
    `vitkit export --int8`'s dynamic int8, and OpenVINO with its default settings (bf16 on
    CPUs with AMX or AVX-512-bf16, else fp32: the mode says which) and in int8 quantised by
    NNCF, where installed. The export (and quantisation) counts in each one's set-up time."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "model.onnx", dynamic_batch=True)
        exported = time.perf_counter() - start
        start = time.perf_counter()
        yield "ort", "fp32", _ort(onnx_session(path)), exported + time.perf_counter() - start
        start = time.perf_counter()
        int8 = quantize_onnx_int8(path, Path(tmp) / "model.int8.onnx")
        yield (
            "ort",
            "int8-dynamic",
            _ort(onnx_session(int8)),
            exported + time.perf_counter() - start,
        )
        if importlib.util.find_spec("openvino") is not None:
            start = time.perf_counter()
            fn, mode = _openvino(path)
            yield "openvino", mode, fn, exported + time.perf_counter() - start
        if importlib.util.find_spec("nncf") is not None:
            start = time.perf_counter()
            fn = _openvino_int8(path, preprocess(_calibration(model), model.config))
            yield "openvino", "int8-nncf", fn, exported + time.perf_counter() - start


def _ort(session: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _openvino(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """OpenVINO's compiled model for `path` (its own threads: as many as torch's) and the
    precision it chose."""
    threads = torch.get_num_threads()
    compiled = _openvino_core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        # The request reuses its output buffer: copied out, as a result must outlive a call.
        return torch.from_numpy(request.infer({0: x.numpy()})[0].copy())

    # The hint reads e.g. "<Type: 'bfloat16'>".
    return run, "bf16" if "bf16" in precision or "bfloat16" in precision else "fp32"


@functools.cache
def _openvino_core() -> Any:
    """The process's one OpenVINO Core, kept for its life. Each Core's CPU plugin installs
    a signal stack of its own for the main thread and, when it goes, reinstalls the one it
    found, even if that one's owner has gone meanwhile: with two Cores freed in the order
    they were made, Python's next signal handler (SIGCHLD when a child process ends, once
    torch's DataLoader has set one) runs on freed memory and crashes the process."""
    import openvino as ov  # an optional peer (vitkit[bench])

    return ov.Core()


def _openvino_int8(path: Path, calibration: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """OpenVINO's int8: the model quantised by NNCF's post-training quantisation (its
    transformer preset, calibrated on `calibration`, normalised images), as an Intel-CPU user
    would make it."""
    import nncf  # an optional peer (vitkit[bench]), with OpenVINO

    core = _openvino_core()
    data = nncf.Dataset([x[None].numpy() for x in calibration])
    quantized = nncf.quantize(
        core.read_model(str(path)),
        data,
        subset_size=len(calibration),
        model_type=nncf.ModelType.TRANSFORMER,
    )
    threads = torch.get_num_threads()
    compiled = core.compile_model(quantized, "CPU", {"INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda x: torch.from_numpy(request.infer({0: x.numpy()})[0].copy())


def _compiled(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`net` (in bf16) compiled by inductor with its weights frozen as constants."""
    compiled = torch.compile(net)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):
            return compiled(x.to(torch.bfloat16))

    return run


def _calibration(model: ViT) -> torch.Tensor:
    """Random images to calibrate int8 on: speed does not depend on what the images show."""
    c = model.config
    gen = torch.Generator().manual_seed(0)
    shape = (32, c.in_channels, c.image_size, c.image_size)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


def bench_inference(
    preset: str, batch: int, rounds: int, device: torch.device, compiled: bool = False
) -> list[Result]:
    model = create_model(preset, num_classes=1000, seed=0).to(device)
    c = model.config
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, device=device)
    # Batch 1 is timed over several calls per round, so that each round lasts long enough.
    calls = max(1, 16 // batch)
    runs: dict[tuple[str, str], Callable] = {}
    setup: dict[tuple[str, str], float] = {}
    with torch.inference_mode():
        modes = inference_modes(model, batch, compiled, TIMM_FAMILY_NAMES.get(preset))
        for impl, mode, fn, seconds in modes:
            seconds += _seconds(lambda fn=fn: fn(x), device)  # first call compiles, if any
            fn(x)
            runs[impl, mode], setup[impl, mode] = fn, seconds
        times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        for _ in range(rounds):
            for key, fn in runs.items():
                seconds = _seconds(lambda fn=fn: [fn(x) for _ in range(calls)], device)
                times[key].append(seconds / calls)
    per_image = flops(c)
    out = []
    for (impl, mode), ts in times.items():
        sec = statistics.median(ts)
        ips = batch / sec
        out.append(
            Result(
                "infer",
                preset,
                batch,
                impl,
                mode,
                sec,
                ips,
                ips * per_image / 1e12,
                setup[impl, mode],
            )
        )
    return out


# -- training -------------------------------------------------------------------------------
def bench_training(
    preset: str, rounds: int, device: torch.device, batch: int | None = None
) -> list[Result]:
    """Steps of AdamW (fused) on cross-entropy at the precision vitkit's training chooses; on
    a GPU also compiled (as `vitkit train --compile`), for vitkit and timm."""
    batch = batch or TRAIN_BATCH.get(preset, 32)
    config = get_preset(preset)
    classes = 10 if config.image_size < 64 else 1000
    model = create_model(config.replace(num_classes=classes), seed=0).to(device)
    c = model.config
    bf16 = auto_bf16(device)
    mode = "bf16-autocast" if bf16 else "fp32"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    nets = {("vitkit", mode): copy.deepcopy(model)}
    nets |= {(impl, mode): net for impl, net in peers(model).items()}
    if device.type == "cuda":
        for impl in ("vitkit", "timm"):
            if (impl, mode) in nets:
                net = copy.deepcopy(nets[impl, mode])
                # static shapes: a second preset in the same process would otherwise
                # recompile with dynamic ones, whose backward failed on CUDA (torch 2.11)
                nets[impl, mode + "-compiled"] = torch.compile(net, dynamic=False)
    steps = {key: _train_step(net.train(), x, y, bf16) for key, net in nets.items()}
    setup = {}
    for key, step in steps.items():
        setup[key] = _seconds(step, device)  # compiles, if compiled
        step()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            times[key].append(_seconds(step, device))
    per_image = 3 * flops(c)  # forward + backward (twice the forward)
    out = []
    for (impl, mode), ts in times.items():
        sec = statistics.median(ts)
        ips = batch / sec
        tflops = ips * per_image / 1e12
        out.append(Result("train", preset, batch, impl, mode, sec, ips, tflops, setup[impl, mode]))
    return out


def _train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> Callable:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05, fused=True)

    def step() -> None:
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# -- report ---------------------------------------------------------------------------------
def report(results: list[Result], peaks: dict[str, float]) -> str:
    """A table of every result (with its share of the peak of its own precision, see
    `peak_of`), then vitkit's best against each peer's best and eager bf16."""
    lines = [
        f"{'task':5} {'model':8} {'batch':>5} {'impl':6} {'mode':14} {'img/s':>9} "
        f"{'ms/batch':>9} {'TFLOP/s':>8} {'of peak':>12} {'setup s':>8}"
    ]
    for r in results:
        own = peak_of(r.mode)
        share = f"{r.tflops / peaks[own]:.0%} {own}" if peaks.get(own) else "-"
        lines.append(
            f"{r.task:5} {r.model:8} {r.batch:>5} {r.impl:6} {r.mode:14} "
            f"{r.images_per_second:9.1f} {r.seconds * 1000:9.1f} {r.tflops:8.3f} "
            f"{share:>12} {r.setup_seconds:8.1f}"
        )
    lines.append("")
    groups: dict[tuple[str, str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.task, r.model, r.batch), []).append(r)
    for (task, model, batch), rs in groups.items():
        ours = max((r for r in rs if r.impl == "vitkit"), key=lambda r: r.images_per_second)
        for impl in PEERS:
            theirs = [r for r in rs if r.impl == impl]
            if not theirs:
                continue
            best = max(theirs, key=lambda r: r.images_per_second)
            text = (
                f"{task} {model} batch {batch}: vitkit {ours.mode} / {impl} fastest "
                f"({best.mode}) = {ours.images_per_second / best.images_per_second:.2f}x"
            )
            eager = [r for r in theirs if r.mode == "bf16-autocast"]
            if eager and task == "infer":
                ratio = ours.images_per_second / eager[0].images_per_second
                text += f"; / {impl} eager bf16 autocast = {ratio:.2f}x"
            if task == "train":  # like against like: the same mode, eager or compiled
                for r in theirs:
                    mine = [m for m in rs if m.impl == "vitkit" and m.mode == r.mode]
                    if mine and r is not best:
                        ratio = mine[0].images_per_second / r.images_per_second
                        text += f"; {r.mode}: {ratio:.2f}x"
            lines.append(text)
        runtimes = [r for r in rs if r.impl in ("ort", "openvino")]
        if runtimes:
            best = max(runtimes, key=lambda r: r.images_per_second)
            ratio = ours.images_per_second / best.images_per_second
            lines.append(
                f"{task} {model} batch {batch}: vitkit {ours.mode} / best CPU runtime "
                f"({best.impl} {best.mode}) = {ratio:.2f}x"
            )
    return "\n".join(lines)
