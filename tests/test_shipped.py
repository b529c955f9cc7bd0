"""The model that ships in the package: loadable by name, and as accurate as its report says."""

import json

import pytest
import torch

import vitkit
from tests.fashion import load_fashion_mnist
from vitkit.weights.format import SHIPPED_DIR


def test_shipped_model_loads_by_name():
    model = vitkit.load_model("fashion-mnist")
    assert model.labels[0] == "T-shirt/top" and model.labels[9] == "Ankle boot"
    # Trained on Fashion-MNIST's 28x28 images resized to 32x32 (see its recipe).
    assert model.config.in_channels == 1 and model.config.image_size == 32
    for name in ("eval.json", "metrics.jsonl", "train.json", "confusion.png", "loss.png"):
        assert (SHIPPED_DIR / "fashion-mnist" / name).is_file(), name


@pytest.mark.slow
def test_shipped_model_accuracy_matches_its_report():
    test = load_fashion_mnist("test")
    reported = json.loads((SHIPPED_DIR / "fashion-mnist" / "eval.json").read_text())["top1"]
    sub = test.subset(torch.arange(2000))
    report = vitkit.evaluate(vitkit.load_model("fashion-mnist"), sub, progress=False)
    # 2,000 of the 10,000 test images: within 2 points of the full-set figure.
    assert report.top1 == pytest.approx(reported, abs=0.02)
    assert report.top1 > 0.85
