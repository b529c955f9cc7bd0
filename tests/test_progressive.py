"""Progressive resizing: small inputs first, whole tokens always, full size by the set fraction
of the epochs, and the model trains at each size."""

from __future__ import annotations

import json

import pytest

from vitkit.cli import build_parser
from vitkit.cli.train import _config
from vitkit.train import TrainConfig, train
from vitkit.train.loop import input_size
from vitkit.train.optim import build_optimizers


def test_schedule_grows_in_whole_tokens_to_full_size():
    cfg = TrainConfig(epochs=15, progressive_size=16, progressive_until=0.6)  # ramp: 9 epochs
    sizes = [input_size(cfg, 8, 32, e) for e in range(15)]
    assert sizes == [16, 16, 16, 16, 16, 24, 24, 24, 24] + [32] * 6
    assert [input_size(TrainConfig(epochs=15), 8, 32, e) for e in (0, 14)] == [32, 32]
    # Never below one token, never above full size.
    tiny = TrainConfig(epochs=4, progressive_size=1)
    assert input_size(tiny, 8, 32, 0) == 8
    assert input_size(TrainConfig(epochs=4, progressive_size=64), 8, 32, 0) == 32


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="progressive_size must be >= 1"):
        TrainConfig.from_dict({"progressive_size": 0})
    with pytest.raises(ValueError, match=r"progressive_until must be in \(0, 1\]"):
        TrainConfig.from_dict({"progressive_until": 1.5})
    args = build_parser().parse_args(["train", "--progressive-size", "16"])
    assert _config(args).progressive_size == 16


def test_training_sees_the_small_size_first(digits, tmp_path, monkeypatch):
    datasets = digits
    cfg = TrainConfig.from_dict(
        {
            "data": "digits",
            "model": "Ti/4@28",
            "model_overrides": {
                "image_size": 8,
                "patch_size": 2,
                "width": 32,
                "depth": 1,
                "heads": 2,
            },
            "epochs": 2,
            "batch_size": 64,
            "lr": 3e-3,
            "precision": "fp32",
            "progressive_size": 4,
        }
    )
    seen: list[int] = []

    def build_and_record(model, *args, **kwargs):
        model.register_forward_pre_hook(
            lambda m, inputs: seen.append(inputs[0].shape[-1]) if m.training else None
        )
        return build_optimizers(model, *args, **kwargs)

    monkeypatch.setattr("vitkit.train.loop.build_optimizers", build_and_record)
    result = train(cfg, tmp_path / "run", progress=False, datasets=datasets)
    steps = len(datasets[0]) // 64
    assert seen == [4] * steps + [8] * steps
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["image_size"] for m in lines] == [4, 8]
    assert result.step == 2 * steps
