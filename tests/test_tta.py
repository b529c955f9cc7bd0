"""Test-time augmentation: the views are the image, its shifts and mirrors, and the score is
that of the views' mean probabilities."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vitkit import create_model
from vitkit.cli import main
from vitkit.data.dataset import ImageDataset
from vitkit.data.preprocess import preprocess
from vitkit.evaluate import evaluate, tta_views
from vitkit.weights import save_model


def test_views_are_shifts_with_zeros_and_mirrors():
    x = torch.arange(1, 2 * 1 * 4 * 5 + 1, dtype=torch.uint8).view(2, 1, 4, 5)
    assert len(tta_views(x, [], 1)) == 1 and torch.equal(tta_views(x, [], 1)[0], x)
    flips = tta_views(x, ["flip"], 1)
    assert len(flips) == 2 and torch.equal(flips[1], x.flip(-1))
    shifts = tta_views(x, ["shift"], 2)
    assert len(shifts) == 5 and all(v.shape == x.shape for v in shifts)
    up = shifts[1]  # content moved down by 2: the top two rows are zeros
    assert torch.equal(up[..., 2:, :], x[..., :2, :]) and not up[..., :2, :].any()
    right = shifts[4]  # content moved left by 2
    assert torch.equal(right[..., :, :3], x[..., :, 2:]) and not right[..., :, 3:].any()
    both = tta_views(x, ["flip", "shift"], 1)
    assert len(both) == 10 and torch.equal(both[7], both[2].flip(-1))


@pytest.fixture(scope="module")
def toy():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 1, 12, 12), dtype=torch.uint8, generator=gen)
    dataset = ImageDataset(images, torch.arange(24) % 3, ["a", "b", "c"], "toy")
    model = create_model(
        "Ti/4@28", image_size=12, patch_size=4, width=16, depth=1, heads=2, num_classes=3, seed=0
    )
    torch.nn.init.normal_(model.head.weight, std=1.0, generator=gen)
    return model.eval(), dataset


def test_score_is_that_of_the_mean_probabilities(toy):
    model, dataset = toy
    with torch.no_grad():
        views = tta_views(dataset.images, ["flip", "shift"], 1)
        probs = torch.stack([model(preprocess(v, model.config)).softmax(-1) for v in views])
    mean = probs.mean(0)
    report = evaluate(
        model, dataset, batch_size=7, progress=False, tta=["shift", "flip"], tta_shift=1
    )
    assert report.tta == ["flip", "shift"]
    assert report.top1 == pytest.approx((mean.argmax(-1) == dataset.labels).float().mean().item())
    assert report.loss == pytest.approx(F.nll_loss(mean.log(), dataset.labels).item(), rel=1e-5)
    plain = evaluate(model, dataset, batch_size=7, progress=False)
    assert plain.tta == [] and plain.loss != pytest.approx(report.loss)
    with pytest.raises(ValueError, match="tta takes flip and shift"):
        evaluate(model, dataset, tta=["rotate"])


def test_eval_command_reports_its_augmentation(toy, tmp_path, monkeypatch, capsys):
    model, dataset = toy
    save_model(model, tmp_path / "m")
    monkeypatch.setattr("vitkit.data.load_dataset", lambda *a, **k: dataset)
    assert main(["eval", str(tmp_path / "m"), "--data", "toy", "--tta", "flip"]) == 0
    assert "test-time augmentation: flip" in capsys.readouterr().out
    assert json.loads((tmp_path / "m/eval/eval.json").read_text())["tta"] == ["flip"]
    assert main(["eval", str(tmp_path / "m"), "--data", "toy", "--tta", "flip", "--knn"]) == 2
    assert "not with --knn" in capsys.readouterr().err
