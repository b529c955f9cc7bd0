"""`vitkit bench`'s report: the ratios it prints are the ones the issue's targets are read from."""

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
