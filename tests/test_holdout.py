"""A validation split held out of the training images: disjoint, stratified, the same for every
run; the test split evaluated once at the end and never used to choose."""

from __future__ import annotations

import json

import pytest
import torch

from vitkit import load_model
from vitkit.cli import build_parser
from vitkit.cli.train import _config
from vitkit.train import TrainConfig, train
from vitkit.train.setup import holdout_indices, model_and_data

# A small, fast encoder for 8x8 digits: 16 patches of 2x2.
TINY = {"image_size": 8, "patch_size": 2, "width": 32, "depth": 2, "heads": 2}
HOLDOUT = 200


def tiny_config(**kw) -> TrainConfig:
    settings = {
        "data": "digits",
        "model": "Ti/4@28",
        "model_overrides": TINY,
        "holdout": HOLDOUT,
        "epochs": 2,
        "batch_size": 128,
        "lr": 2e-3,
        "warmup_epochs": 0.5,
        "precision": "fp32",
        "augment": {"crop_padding": 1},
    }
    return TrainConfig.from_dict(settings | kw)


def test_held_out_images_are_disjoint_stratified_and_fixed(digits):
    labels = digits[0].labels
    kept, held = holdout_indices(labels, HOLDOUT)
    assert len(held) == HOLDOUT and len(kept) + len(held) == len(labels)
    assert torch.equal(torch.cat([kept, held]).sort().values, torch.arange(len(labels)))
    counts, totals = labels[held].bincount(minlength=10), labels.bincount(minlength=10)
    share = totals * HOLDOUT / len(labels)
    assert ((counts - share).abs() <= 1).all(), (counts, share)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(holdout_indices(labels, HOLDOUT)[1], held)
    # Equal classes (as Fashion-MNIST's 6,000 each) give exactly equal shares.
    kept, held = holdout_indices(torch.arange(10).repeat(60), 100)
    assert (torch.arange(10).repeat(60)[held].bincount() == 10).all()


def test_same_images_for_every_training_seed(digits):
    runs = [model_and_data(tiny_config(seed=s), None, digits) for s in (0, 1)]
    (_, train_a, val_a, test_a), (_, train_b, val_b, test_b) = runs
    assert len(val_a) == HOLDOUT and len(train_a) == len(digits[0]) - HOLDOUT
    assert torch.equal(val_a.images, val_b.images) and torch.equal(train_a.images, train_b.images)
    assert test_a is digits[1] and test_b is digits[1]
    # Without a holdout the test split validates, as before.
    _, train, val, test = model_and_data(tiny_config(holdout=0), None, digits)
    assert train is digits[0] and val is digits[1] and test is None


def test_validates_on_the_holdout_and_tests_once_at_the_end(digits, tmp_path, capsys):
    result = train(tiny_config(max_steps=12), tmp_path / "run", datasets=digits)
    out = capsys.readouterr().out
    assert "validation: 200 training images held out (seed fixed)" in out
    assert "test acc (final weights, evaluated once)" in out
    log = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [(len(digits[0]) - HOLDOUT) // 128, 12]
    assert all(m["val_images"] == HOLDOUT for m in log)
    assert "test_acc" not in log[0]
    assert log[-1]["test_images"] == len(digits[1])
    assert log[-1]["test_acc"] == result.test_acc and result.val_acc == log[-1]["val_acc"]
    assert json.loads((tmp_path / "run/train.json").read_text())["holdout"] == HOLDOUT


def test_without_holdout_there_is_no_test_evaluation(digits, tmp_path):
    result = train(
        tiny_config(holdout=0, max_steps=3), tmp_path / "run", progress=False, datasets=digits
    )
    log = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert result.test_acc is None and "test_acc" not in log
    assert log["val_images"] == len(digits[1])


def test_bad_holdouts_are_clear_errors(digits, tmp_path):
    with pytest.raises(ValueError, match="holdout must be >= 0"):
        tiny_config(holdout=-1)
    n = len(digits[0])
    with pytest.raises(ValueError, match=f"holdout {n}: must be .* less than the {n} training"):
        train(tiny_config(holdout=n), tmp_path / "r", progress=False, datasets=digits)
    with pytest.raises(ValueError, match="holdout is for named datasets"):
        model_and_data(tiny_config(data=str(tmp_path)), None, None)
    assert _config(build_parser().parse_args(["train", "--holdout", "5000"])).holdout == 5000


@pytest.mark.slow
def test_resume_holds_out_the_same_images(digits, tmp_path):
    cfg = tiny_config(epochs=1)
    full = train(cfg, tmp_path / "full", progress=False, datasets=digits)
    train(tiny_config(epochs=1, max_steps=4), tmp_path / "part", progress=False, datasets=digits)
    # The saved settings hold the holdout: the resumed run's default of 0 does not apply.
    resumed = train(TrainConfig(), tmp_path / "part", resume=True, progress=False, datasets=digits)
    assert resumed.step == full.step == (len(digits[0]) - HOLDOUT) // 128
    a, b = load_model(tmp_path / "full").state_dict(), load_model(tmp_path / "part").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed.val_acc, resumed.test_acc) == (full.val_acc, full.test_acc)
