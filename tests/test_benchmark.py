"""`vitkit bench`'s report: the ratios it prints are the ones the issue's targets are read from."""

import ctypes
import gc
import importlib.util

import pytest
import torch

from vitkit import benchmark
from vitkit.benchmark import Result, report
from vitkit.cli import main


def _result(task: str, impl: str, mode: str, ips: float, batch: int = 32) -> Result:
    return Result(task, "S/16", batch, impl, mode, batch / ips, ips, ips * 1e-3, 0.0)


def test_report_ratios_against_fastest_and_eager() -> None:
    results = [
        _result("infer", "vitkit", "bf16", 60.0),
        _result("infer", "vitkit", "int8", 100.0),
        _result("infer", "timm", "bf16-autocast", 40.0),
        _result("infer", "timm", "bf16-compiled", 50.0),
        _result("train", "vitkit", "bf16-autocast", 30.0),
        _result("train", "vitkit", "bf16-autocast-compiled", 36.0),
        _result("train", "timm", "bf16-autocast", 20.0),
        _result("train", "timm", "bf16-autocast-compiled", 24.0),
    ]
    text = report(results, {"fp32": 0.2, "bf16": 0.8})
    assert (
        "infer S/16 batch 32: vitkit int8 / timm fastest (bf16-compiled) = 2.00x; "
        "/ timm eager bf16 autocast = 2.50x" in text
    )
    # Training: best against best, then like against like (eager against eager).
    assert (
        "train S/16 batch 32: vitkit bf16-autocast-compiled / timm fastest "
        "(bf16-autocast-compiled) = 1.50x; bf16-autocast: 1.50x" in text
    )
    assert "hf" not in text.split("\n\n")[1]  # no line for a peer that was not measured


def test_report_compares_with_the_best_cpu_runtime() -> None:
    results = [
        _result("infer", "vitkit", "int8", 90.0),
        _result("infer", "ort", "fp32", 30.0),
        _result("infer", "ort", "int8-dynamic", 45.0),
        _result("infer", "openvino", "bf16", 60.0),
    ]
    text = report(results, {"fp32": 0.2, "bf16": 0.8, "int8": 0.4})
    assert "vitkit int8 / ort fastest (int8-dynamic) = 2.00x" in text
    assert "vitkit int8 / openvino fastest (bf16) = 1.50x" in text
    assert "vitkit int8 / best CPU runtime (openvino bf16) = 1.50x" in text


def test_each_row_is_a_share_of_its_own_precisions_peak() -> None:
    results = [
        _result("infer", "vitkit", "int8", 100.0),  # 0.1 TOPS
        _result("infer", "timm", "bf16-compiled", 50.0),  # 0.05 TFLOP/s
        _result("infer", "hf", "fp32", 20.0),  # 0.02 TFLOP/s
    ]
    rows = report(results, {"fp32": 0.2, "bf16": 0.8, "int8": 0.4}).splitlines()[1:4]
    assert "25% int8" in rows[0] and "6% bf16" in rows[1] and "10% fp32" in rows[2]
    # Without an int8 peak (a GPU), int8 rows show none rather than a wrong share.
    assert " - " in report(results, {"fp32": 0.2, "bf16": 0.8}).splitlines()[1]


@pytest.mark.slow
def test_the_int8_peak_is_measured_through_onednn() -> None:
    assert benchmark.int8_matmul_peak(repeats=1) > 0
    isa, kernel = benchmark.int8_kernel().split("; ")
    assert "unknown" not in isa and kernel != "unknown"  # e.g. "Intel AVX2", "gemm:jit"
    assert "threads" in benchmark.machine(torch.device("cpu"))


def test_the_onnx_runtime_int8_peak_is_measured() -> None:
    """The peak of the kernel vitkit's int8 runs on CPUs without VNNI: ONNX Runtime's integer
    matmul, counted as 2 * 2048**3 operations a call (a plausible, nonzero rate)."""
    assert 0.01 < benchmark.ort_int8_matmul_peak(repeats=1) < 1000


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_bench_on_missing_gpu_says_so() -> None:
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        main(["bench", "--device", "cuda", "--no-infer"])


def test_bench_without_its_peers_names_the_extra(monkeypatch, capsys) -> None:
    monkeypatch.setattr(benchmark, "PEER_PACKAGES", ("timm", "no_such_peer_package"))
    assert main(["bench", "--no-infer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitkit bench: error: no_such_peer_package not installed")
    assert "pip install 'vitkit[bench]'" in err and len(err.splitlines()) == 1


class _StackT(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


def _signal_stack() -> tuple[int, int, int]:
    """The calling thread's alternate signal stack (sigaltstack): address, flags, size."""
    s = _StackT()
    assert ctypes.CDLL(None, use_errno=True).sigaltstack(None, ctypes.byref(s)) == 0
    return s.sp or 0, s.flags, s.size


@pytest.mark.slow
def test_the_cpu_runtimes_run_the_same_model() -> None:
    """ONNX Runtime and OpenVINO, as `vitkit bench` runs them, give the model's logits (int8:
    its top class)."""
    from vitkit import create_model

    model = create_model("Ti/4@28", width=64, depth=2, heads=2, seed=0).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(x)
        made = list(benchmark.runtime_modes(model))
        modes = {(impl, mode): fn(x) for impl, mode, fn, _ in made}
    # The main thread's signal stack, where Python's signal handlers run, outlives the
    # runtimes: freed, or swapped for a freed one, a SIGCHLD would crash the process.
    stack = _signal_stack()
    del made
    gc.collect()
    assert _signal_stack() == stack
    assert {"ort"} <= {impl for impl, _ in modes} and ("ort", "int8-dynamic") in modes
    if importlib.util.find_spec("nncf") is not None:
        assert ("openvino", "int8-nncf") in modes
    for (impl, mode), got in modes.items():
        if mode == "fp32":
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        else:
            assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.8, (impl, mode)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(benchmark.TIMM_FAMILY_NAMES))
def test_families_are_timed_against_timms_own_architecture(timm, preset) -> None:
    """DINOv2 and CLIP are compared with timm's model of that name, holding the same weights
    (shrunk to two blocks: the layers, not the depth, are what must match)."""
    from vitkit.model.factory import create_model

    model = create_model(preset, num_classes=10, seed=0, depth=2, image_size=112).eval()
    name = benchmark.TIMM_FAMILY_NAMES[preset]
    theirs = benchmark.timm_model(model, name).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=0)
