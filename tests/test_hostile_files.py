"""Hostile or odd files given to `vitkit predict` and image folders: PostScript disguised as an
image, FIFOs, control characters in names, and results streamed as they are computed."""

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

import vitkit.infer.predict as predict_module
from vitkit.cli import main
from vitkit.data.folder import load_image_folder
from vitkit.data.preprocess import UnreadableImage, load_image
from vitkit.infer.predict import Classifier
from vitkit.weights.format import load_model

MODEL = "fashion-mnist"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto\n"


def save_png(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "PNG")
    return path


def fake_ghostscript(folder: Path) -> tuple[Path, Path]:
    """(a folder holding a `gs` that leaves a marker file when run, the marker's path)."""
    bin_dir, marker = folder / "bin", folder / "ghostscript-ran"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    gs.chmod(0o755)
    return bin_dir, marker


@dataclass
class Run:
    eps: Path
    fifo: Path
    good: Path
    marker: Path
    done: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Run:
    """One `vitkit predict` over an EPS file named .png (with a fake Ghostscript on PATH), a
    FIFO that nothing writes to, and a good image, in a process of its own that is killed
    after a minute rather than hanging."""
    folder = tmp_path_factory.mktemp("hostile")
    bin_dir, marker = fake_ghostscript(folder)
    eps, fifo = folder / "cat.png", folder / "pipe.png"
    eps.write_bytes(EPS)
    os.mkfifo(fifo)
    good = save_png(folder / "good.png")
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    argv = [sys.executable, "-m", "vitkit", "predict", MODEL, str(eps), str(fifo), str(good)]
    done = subprocess.run(
        [*argv, "--precision", "fp32"], capture_output=True, text=True, env=env, timeout=60
    )
    return Run(eps, fifo, good, marker, done)


@pytest.mark.slow
def test_predict_refuses_eps_named_png_without_running_ghostscript(hostile_run):
    assert hostile_run.done.returncode == 1
    assert not hostile_run.marker.exists()
    eps_error = f"{hostile_run.eps}: cannot read image: not an image in a format read here"
    assert eps_error in hostile_run.done.stderr.splitlines()[0]


@pytest.mark.slow
def test_predict_refuses_a_fifo_without_blocking(hostile_run):
    # Reaching here at all means the run ended: opening the FIFO would have waited forever.
    fifo_error = f"{hostile_run.fifo}: cannot read image: not a regular file (a FIFO)"
    assert hostile_run.done.stderr.splitlines()[1] == f"vitkit predict: error: {fifo_error}"


@pytest.mark.slow
def test_predict_classifies_good_images_beside_hostile_ones(hostile_run):
    assert len(hostile_run.done.stderr.splitlines()) == 2
    (line,) = hostile_run.done.stdout.splitlines()
    assert line.startswith(f"{hostile_run.good}: ")


def test_a_fifo_is_refused_at_once_in_process(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # nothing ever writes to it: opening it to read would wait forever
    with pytest.raises(UnreadableImage, match=r"not a regular file \(a FIFO\)"):
        load_image(fifo)


def test_devices_and_directories_are_refused_by_kind(tmp_path):
    with pytest.raises(UnreadableImage, match=r"null: cannot read image: .*\(a device\)"):
        load_image("/dev/null")
    with pytest.raises(UnreadableImage, match=r"not a regular file \(a directory\)"):
        load_image(tmp_path)


def test_eps_in_an_image_folder_never_reaches_ghostscript(tmp_path, monkeypatch):
    bin_dir, marker = fake_ghostscript(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    # Pillow remembers whether it found Ghostscript; look again, with the fake one on PATH.
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "cat.png").write_bytes(EPS)
    save_png(root / "cats" / "good.png")

    ds = load_image_folder(root, channels=1, image_size=28)
    assert not marker.exists()
    assert len(ds.images) == 1
    ((path, reason),) = ds.skipped
    assert path == str(root / "cats" / "cat.png") and "not an image in a format" in reason


def test_every_allowed_format_is_read_by_files_and_the_service(tmp_path):
    from vitkit.serve.decode import decode_image

    config = load_model(MODEL).config
    for fmt in ("PNG", "JPEG", "MPO", "GIF", "BMP", "WEBP", "TIFF", "PPM"):
        path = tmp_path / f"image.{fmt.lower()}"
        Image.new("RGB", (30, 20), (200, 100, 50)).save(path, fmt)
        assert load_image(path, 1, 28).shape == (1, 28, 28), fmt
        pixels = decode_image(path.read_bytes(), config, max_pixels=10_000)
        assert pixels.shape == (config.in_channels, config.image_size, config.image_size), fmt


def test_control_characters_in_names_are_escaped_in_text_exact_in_json(tmp_path, capsys):
    odd = save_png(tmp_path / "new\nline\tand tab.png")
    bad = tmp_path / "fake\x1b[2K\rok.png"
    bad.write_bytes(b"not an image")
    shown_odd = str(odd).replace("\n", "\\n").replace("\t", "\\t")
    shown_bad = str(bad).replace("\x1b", "\\x1b").replace("\r", "\\r")

    assert main(["predict", MODEL, str(odd), str(bad), "--precision", "fp32"]) == 1
    out, err = capsys.readouterr()
    (line,) = out.splitlines()
    assert line.startswith(f"{shown_odd}: ")
    (error,) = err.splitlines()
    assert error.startswith(f"vitkit predict: error: {shown_bad}: cannot read image")

    assert main(["predict", MODEL, str(odd), str(bad), "--precision", "fp32", "--json"]) == 1
    rows = [json.loads(row) for row in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == [str(odd), str(bad)]
    assert rows[0]["error"] is None and str(bad) in rows[1]["error"]


def test_predict_command_writes_each_batch_as_it_is_done(tmp_path, monkeypatch):
    files = [save_png(tmp_path / f"{i}.png", seed=i) for i in range(6)]
    # Block-buffered, as stdout is when piped: only flushed lines reach `raw`.
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8"))
    written_before_each_load = []
    real_load_image = predict_module.load_image

    def spy(*args, **kwargs):
        written_before_each_load.append(raw.getvalue().count(b"\n"))
        return real_load_image(*args, **kwargs)

    monkeypatch.setattr(predict_module, "load_image", spy)
    argv = ["predict", MODEL, str(tmp_path), "--batch-size", "2", "--precision", "fp32", "--json"]
    assert main(argv) == 0
    sys.stdout.flush()
    assert written_before_each_load == [0, 0, 2, 2, 4, 4]
    rows = [json.loads(line) for line in raw.getvalue().decode().splitlines()]
    assert [r["path"] for r in rows] == [str(f) for f in files]
    assert all(r["error"] is None and len(r["predictions"]) == 5 for r in rows)


def test_predict_iter_reads_no_further_than_the_batch_it_yields(tmp_path):
    now = [save_png(tmp_path / f"now{i}.png", seed=i) for i in range(2)]
    later = [tmp_path / f"later{i}.png" for i in range(2)]
    results = Classifier(MODEL, batch_size=2).predict_iter([*now, *later], top_k=1)
    assert isinstance(results, Iterator)
    first = next(results)
    assert first.source == str(now[0]) and first.error is None
    for i, path in enumerate(later):  # only now do the later inputs exist
        save_png(path, seed=10 + i)
    rest = list(results)
    assert [p.source for p in rest] == [str(now[1]), *map(str, later)]
    assert all(p.error is None and len(p.labels) == 1 for p in rest)


def test_classifier_reads_a_folder_given_among_files(tmp_path):
    from PIL import Image

    from vitkit.infer.predict import Classifier

    folder = tmp_path / "boots"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (28, 28), 40 * i).save(folder / f"{i}.png")
    results = Classifier("fashion-mnist", batch_size=2).predict([folder, folder / "0.png"])
    assert [r.source for r in results] == [str(folder / f"{i}.png") for i in (0, 1, 2, 0)]
    assert all(r.error is None and r.labels for r in results)
