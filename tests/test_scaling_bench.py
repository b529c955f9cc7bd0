"""bench/scaling.py's grid on a few random images: every run is trained and scored after its
last epoch, the subsets nest, the gap is paired by seed, and the plot is written."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from vitkit.data import ImageDataset

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fake(n: int, size: int, seed: int) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 10
    return ImageDataset(images, labels, [str(c) for c in range(10)], "fake")


def test_subsets_are_stratified_and_nested(scaling):
    ds = fake(400, 28, 0)
    small, large = scaling.subset(ds, 0.1), scaling.subset(ds, 0.5)
    assert len(small) == 40 and len(large) == 200
    assert torch.bincount(small.labels).tolist() == [4] * 10
    rows = {tuple(x.flatten().tolist()) for x in large.images}
    assert all(tuple(x.flatten().tolist()) in rows for x in small.images)


@pytest.mark.slow
def test_grid_runs_and_summarises(scaling, tmp_path):
    data = {px: (fake(300, px, 1), fake(60, px, 2)) for px in (28, 32)}
    seen = []
    runs = scaling.run_grid(data, ["S"], [1.0], [0, 1], 1, [], seen.append)
    assert len(runs) == len(seen) == 2 * 2  # models x seeds
    assert {r["steps"] for r in runs} == {300 // 128}
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in runs)
    # A resumed grid trains nothing it already has.
    again = scaling.run_grid(data, ["S"], [1.0], [0, 1], 1, runs, seen.append)
    assert again == runs and len(seen) == 4

    summary = scaling.summarise(runs, ["S"], [1.0])
    acc = {(r["kind"], r["seed"]): r["test_acc"] for r in runs}
    (gap,) = summary["gaps"]
    diffs = [acc["hybrid", s] - acc["vit", s] for s in (0, 1)]
    assert gap["seeds"] == 2 and gap["gap_mean"] == pytest.approx(sum(diffs) / 2)
    scaling.plot(summary, [0.5, 1.0], tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 0
