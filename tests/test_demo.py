"""The README's first command, `make demo`, and `python -m vitkit`."""

import runpy
import sys

import pytest
from PIL import Image

from tests.fashion import load_fashion_mnist
from vitkit.demo import write_samples


def test_demo_samples_one_image_per_class(tmp_path):
    test = load_fashion_mnist("test")  # skips when the dataset is not installed
    paths = write_samples(tmp_path)
    assert len(paths) == len(test.classes) == 10
    assert paths[0].name.startswith("t-shirt-top-")
    with Image.open(paths[0]) as image:
        assert image.size == (28, 28) and image.mode == "L"


def test_python_m_vitkit_runs_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vitkit", "models"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("vitkit", run_name="__main__")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "H/14" in out and "632,045,800" in out
