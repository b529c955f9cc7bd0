"""Training and evaluating from every kind of collection: WebDataset shards, a Hugging Face
dataset saved to disk and a CSV manifest, streamed or in memory, give the held-out scores that
`vitkit eval` reproduces on the saved model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitkit.cli import main
from vitkit.data import ImageDataset, ImageStream
from vitkit.data.shards import pack_folder
from vitkit.data.sources import open_source
from vitkit.train import TrainConfig, train
from vitkit.train.setup import load_splits

CLASSES = ("dark", "light", "red")


def picture(label: int, seed: int) -> Image.Image:
    """A noisy picture whose colour says its class."""
    rng = np.random.default_rng(seed)
    base = np.array([(40, 40, 40), (200, 200, 200), (200, 40, 40)][label])
    h, w = (int(n) for n in rng.integers(20, 40, 2))
    pixels = np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    for label, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(12):
            picture(label, 100 * label + i).save(root / name / f"{i:02d}.png")
    return root


def as_shards(folder: Path, out: Path) -> str:
    pack_folder(folder, out, shard_bytes=4_000)
    return str(out)


def as_hf(folder: Path, out: Path) -> str:
    datasets = pytest.importorskip("datasets")
    files = sorted(folder.glob("*/*.png"))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}
    )
    rows = {
        "image": [str(f) for f in files],
        "label": [CLASSES.index(f.parent.name) for f in files],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(out))
    return str(out)


def as_manifest(folder: Path, out: Path) -> str:
    out.mkdir()
    lines = ["path,label"]
    for f in sorted(folder.glob("*/*.png")):
        (out / f.parent.name).mkdir(exist_ok=True)
        (out / f.parent.name / f.name).write_bytes(f.read_bytes())
        lines.append(f"{f.parent.name}/{f.name},{f.parent.name}")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return str(out / "labels.csv")


def config(data: str, **kw) -> TrainConfig:
    settings = {
        "data": data,
        "model": "Ti/4@28",
        "model_overrides": {"image_size": 16, "patch_size": 4, "width": 32, "depth": 1, "heads": 2},
        "workers": 1,
        "epochs": 2,
        "batch_size": 8,
        "lr": 3e-3,
        "val_fraction": 0.25,
        "precision": "fp32",
        "augment": {"random_resized_crop": True, "crop_scale": [0.5, 1.0]},
    }
    return TrainConfig.from_dict(settings | kw)


@pytest.mark.slow
@pytest.mark.parametrize("write", [as_shards, as_hf, as_manifest])
def test_a_collection_trains_and_evaluates(folder, tmp_path, write, capsys):
    data = write(folder, tmp_path / "collection")
    # The held-out part is the folder's own: the same stratified split for every kind.
    val = open_source(data, "val", val_fraction=0.25)
    assert len(val) == len(open_source(folder, "val", val_fraction=0.25)) == 9
    assert sorted(val.labels) == sorted(open_source(folder, "val", val_fraction=0.25).labels)

    result = train(config(data, stream=True), tmp_path / "run", progress=False)
    assert "streamed from its files, as asked" in capsys.readouterr().out
    assert result.val_acc is not None and result.val_acc > 1 / 3  # colours are easy to learn
    argv = ["eval", str(tmp_path / "run"), "--data", data, "--split", "val", "--json"]
    assert main([*argv, "--out", str(tmp_path / "eval")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 9
    assert report["top1"] == pytest.approx(result.val_acc)


@pytest.mark.slow
@pytest.mark.parametrize("write", [as_shards, as_hf, as_manifest])
def test_in_memory_and_streamed_hold_the_same_images(folder, tmp_path, write):
    data = write(folder, tmp_path / "collection")
    kept, kept_val = load_splits(config(data, stream=False), 16, 3)
    streamed, streamed_val = load_splits(config(data, stream=True), 16, 3)
    assert isinstance(kept, ImageDataset) and isinstance(streamed, ImageStream)
    assert kept.classes == streamed.classes == list(CLASSES)
    assert len(kept) == len(streamed) == 27
    images, labels = next(streamed_val.batches(0, range(9), 9))
    assert (images == kept_val.images).all() and (labels == kept_val.labels).all()
