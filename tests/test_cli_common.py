"""Rules that several subcommands share."""

import os

import pytest

from vitkit import create_model, save_model
from vitkit.cli.common import default_out
from vitkit.weights.format import SHIPPED_DIR


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return save_model(create_model("Ti/4@28", depth=1), tmp_path / "mine")


def test_outputs_go_beside_the_model(model_dir):
    assert default_out(model_dir, "eval") == model_dir / "eval"
    assert default_out(model_dir, "onnx") == model_dir / "model.onnx"


def test_outputs_of_a_shipped_model_go_to_the_current_directory(model_dir):
    shipped = SHIPPED_DIR / "fashion-mnist"
    assert str(default_out(shipped, "eval")) == "fashion-mnist.eval"
    assert str(default_out(shipped, "onnx")) == "fashion-mnist.onnx"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_outputs_of_a_read_only_model_go_to_the_current_directory(model_dir):
    model_dir.chmod(0o555)
    try:
        assert str(default_out(model_dir, "onnx")) == "mine.onnx"
    finally:
        model_dir.chmod(0o755)
