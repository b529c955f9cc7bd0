"""DeiT distillation: the distillation token's head learns the teacher, [CLS]'s the labels, and
the model answers with their mean."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vitkit import create_model, load_model
from vitkit.cli import build_parser
from vitkit.cli.train import _config
from vitkit.data.preprocess import preprocess
from vitkit.train import TrainConfig, train
from vitkit.train.distill import distillation_loss, load_teacher, teacher_logits
from vitkit.weights import save_model

TINY = {"image_size": 8, "patch_size": 2, "width": 32, "depth": 1, "heads": 2}


def test_heads_apart_in_distillation_training_their_mean_otherwise():
    model = create_model("Ti/4@28", seed=0, distilled=True, num_classes=3, **TINY)
    torch.nn.init.normal_(model.head_dist.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    mean = model(x)
    model.train().distilling = True
    cls, dist = model(x)
    assert torch.allclose((cls + dist) / 2, mean, atol=1e-6) and not torch.allclose(cls, dist)
    model.eval()
    assert model(x).shape == (2, 3)  # evaluation always answers with the mean


def test_losses():
    gen = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    hard = distillation_loss(logits, teacher, "hard")
    assert hard == pytest.approx(F.cross_entropy(logits, teacher.argmax(-1)).item())
    assert distillation_loss(teacher, teacher, "soft", 2.0).abs() < 1e-6
    p, q = F.softmax(teacher / 2, -1), F.log_softmax(logits / 2, -1)
    expected = 4 * (p * (p.log() - q)).sum(-1).mean()
    assert distillation_loss(logits, teacher, "soft", 2.0) == pytest.approx(expected.item())


def test_teacher_sees_its_own_input():
    student = create_model("Ti/4@28", seed=0, distilled=True, num_classes=3, **TINY)
    teacher = create_model(
        "Ti/4@28",
        seed=1,
        num_classes=3,
        image_size=12,
        patch_size=4,
        width=16,
        depth=1,
        heads=2,
        in_channels=1,
        mean=(0.3,),
        std=(0.2,),
    )
    torch.nn.init.normal_(teacher.head.weight, generator=torch.Generator().manual_seed(1))
    pixels = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    got = teacher_logits(teacher.eval(), student, preprocess(pixels, student.config))
    assert torch.allclose(got, teacher(preprocess(pixels, teacher.config)), atol=1e-5)


def config(**kw) -> TrainConfig:
    settings = {
        "data": "digits",
        "model": "Ti/4@28",
        "model_overrides": TINY,
        "epochs": 2,
        "batch_size": 64,
        "lr": 3e-3,
        "warmup_epochs": 0.2,
        "precision": "fp32",
    }
    return TrainConfig.from_dict(settings | kw)


@pytest.mark.slow  # two training runs; the module's other tests are quick
def test_a_teacher_trains_the_distillation_head(digits, tmp_path, monkeypatch):
    train(config(), tmp_path / "teacher", progress=False, datasets=digits)
    teacher = load_model(tmp_path / "teacher")
    student_cfg = config(
        epochs=1, teacher=str(tmp_path / "teacher"), model_overrides=TINY | {"distilled": True}
    )
    losses = []
    original = distillation_loss

    def recorded(*args, **kwargs):
        losses.append(original(*args, **kwargs).item())
        return original(*args, **kwargs)

    monkeypatch.setattr("vitkit.train.loop.distillation_loss", recorded)
    result = train(student_cfg, tmp_path / "student", progress=False, datasets=digits)
    assert len(losses) == result.step and all(x == x for x in losses)  # every step, finite
    assert losses[-1] < losses[0]
    student = load_model(tmp_path / "student")
    assert student.config.distilled and not student.distilling  # a plain model again
    x = preprocess(digits[1].images[:200], student.config)
    agree = (student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean()
    assert agree > 0.3  # chance: about 0.1
    saved = json.loads((tmp_path / "student/train.json").read_text())
    assert saved["teacher"] == str(tmp_path / "teacher") and saved["distill"] == "hard"


def test_what_cannot_be_taught_is_refused(digits, tmp_path):
    student = create_model("Ti/4@28", seed=0, num_classes=10, **TINY)
    teacher = create_model("Ti/4@28", seed=0, num_classes=3, **TINY)
    save_model(teacher, tmp_path / "t3")
    with pytest.raises(ValueError, match="needs distilled = true"):
        load_teacher(str(tmp_path / "t3"), student, torch.device("cpu"))
    student = create_model("Ti/4@28", seed=0, num_classes=10, distilled=True, **TINY)
    with pytest.raises(ValueError, match="has 3 classes, the model 10"):
        load_teacher(str(tmp_path / "t3"), student, torch.device("cpu"))
    with pytest.raises(ValueError, match="distill_temperature must be > 0"):
        config(distill="soft", distill_temperature=0.0)
    args = build_parser().parse_args(["train", "--teacher", "t", "--distill", "soft"])
    assert (_config(args).teacher, _config(args).distill) == ("t", "soft")
