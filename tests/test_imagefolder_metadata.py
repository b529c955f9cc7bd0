"""Hugging Face's imagefolder layout read without `datasets`: a folder's `metadata.csv` or
`metadata.jsonl` (file_name, label) is a manifest, split by fraction, or by its train/ and
validation/, val/ or test/ folders; every command that reads collections reads it."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.cli import main
from vitkit.data import load_image
from vitkit.data.dataset import DatasetError
from vitkit.data.inspect import inspect_source
from vitkit.data.sources import open_source, source_kind

CLASSES = ("dark", "light", "red")


def picture(label: int, seed: int) -> bytes:
    """A noisy PNG whose colour says its class, each seed its own."""
    rng = np.random.default_rng(seed)
    base = np.array([(40, 40, 40), (200, 200, 200), (200, 40, 40)][label])
    h, w = (int(n) for n in rng.integers(12, 30, 2))
    pixels = np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def write_split(folder: Path, n: int, seed: int, fmt: str) -> list[tuple[str, str, bytes]]:
    """`n` images under `folder` (some in subfolders) and their metadata file in `fmt` ("csv"
    or "jsonl"), listed out of file order: (file_name, label, image bytes) of each row."""
    rows = []
    for i in range(n):
        label = (i * 7 + seed) % len(CLASSES)
        name = f"{i:03d}.png" if i % 3 else f"more/{i:03d}.png"
        data = picture(label, seed * 1000 + i)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        rows.append((name, CLASSES[label], data))
    rows.reverse()  # the metadata's order, not the files', is the source's
    if fmt == "csv":
        with open(folder / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "label", "caption"])
            writer.writerows([name, label, "a, quoted note"] for name, label, _ in rows)
    else:
        lines = [json.dumps({"file_name": name, "label": label}) for name, label, _ in rows]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return rows


def read_back(source) -> list[tuple[str, torch.Tensor]]:
    """(class name, image at 16 px) of each of a source's images."""
    return [
        (source.classes[label], load_image(source.read(i), 3, 16))
        for i, label in enumerate(source.labels)
    ]


def as_written(rows: list[tuple[str, str, bytes]]) -> list[tuple[str, torch.Tensor]]:
    return [(label, load_image(io.BytesIO(data), 3, 16)) for _, label, data in rows]


def same(read: list[tuple[str, torch.Tensor]], written: list[tuple[str, torch.Tensor]]) -> bool:
    return len(read) == len(written) and all(
        a == b and torch.equal(x, y) for (a, x), (b, y) in zip(read, written, strict=True)
    )


@pytest.fixture
def one_folder(tmp_path) -> tuple[Path, list[tuple[str, str, bytes]]]:
    """A folder with a root metadata.csv (and a class subfolder it overrules)."""
    root = tmp_path / "pets"
    root.mkdir()
    rows = write_split(root, 24, 0, "csv")
    (root / "not-a-class").mkdir()
    (root / "not-a-class" / "x.png").write_bytes(picture(0, 999))
    return root, rows


@pytest.fixture
def split_folders(tmp_path) -> tuple[Path, dict[str, list[tuple[str, str, bytes]]]]:
    """train/ and test/ folders, each with its metadata.jsonl."""
    root = tmp_path / "pets-splits"
    splits = {}
    for seed, name in enumerate(("train", "test")):
        (root / name).mkdir(parents=True)
        splits[name] = write_split(root / name, 15 if name == "train" else 6, seed, "jsonl")
    return root, splits


def test_root_metadata_is_split_by_fraction(one_folder):
    root, rows = one_folder
    assert source_kind(root) == "manifest"
    train, val = (open_source(root, s, val_fraction=0.25) for s in ("train", "val"))
    assert train.name == val.name == "pets"
    assert train.classes == val.classes == list(CLASSES)
    assert len(train) + len(val) == len(rows) and len(val) == 6
    # Together the two parts are the rows written, each image read as the file it names.
    read = read_back(train) + read_back(val)
    parts = train.indices + val.indices
    assert sorted(parts) == list(range(len(rows)))
    written = as_written(rows)
    assert same(read, [written[i] for i in parts])


def test_split_folders_use_their_own_metadata(split_folders):
    root, splits = split_folders
    assert source_kind(root) == "manifest"
    train = open_source(root, "train")
    assert same(read_back(train), as_written(splits["train"]))
    for held_out in ("val", "test"):  # "val" falls back on test/
        source = open_source(root, held_out)
        assert source.name == "pets-splits" and source.classes == train.classes
        assert same(read_back(source), as_written(splits["test"]))
    (root / "test").rename(root / "validation")
    for held_out in ("val", "test"):  # "test" falls back on validation/
        assert same(read_back(open_source(root, held_out)), as_written(splits["test"]))


def test_held_out_classes_are_the_training_ones(split_folders):
    root, _ = split_folders
    (root / "test" / "metadata.jsonl").write_text('{"file_name": "000.png", "label": "owl"}\n')
    with pytest.raises(DatasetError, match=r"test/metadata\.jsonl: label 'owl' is not among"):
        open_source(root, "val")


def test_label_columns(tmp_path):
    root = tmp_path / "birds"
    root.mkdir()
    (root / "a.png").write_bytes(picture(0, 1))
    (root / "b.png").write_bytes(picture(1, 2))
    (root / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "labels": "wren", "species": "x"}\n'
        '{"file_name": "b.png", "labels": "tit", "species": "y"}\n'
    )
    assert open_source(root, "train", val_fraction=0.5).classes == ["tit", "wren"]
    named = open_source(root, "train", val_fraction=0.5, label_column="species")
    assert named.classes == ["x", "y"]
    message = f"{root / 'metadata.jsonl'}: line 1: no 'colour' key"
    with pytest.raises(DatasetError, match=re.escape(message)):
        open_source(root, "train", label_column="colour")


REFUSED = {
    "escaping path": ("file_name,label\na.png,x\nsub/../../a.png,x\n", "line 3: .*leads out"),
    "absolute path": ("file_name,label\n/etc/passwd,x\n", "line 2: .*absolute"),
    "no label": ("file_name,species\na.png,x\n", r"line 1: no 'label' column \(nor 'labels'\)"),
    "no file name": ("name,label\na.png,x\n", r"line 1: no 'path' column \(nor 'file_name'\)"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_in_one_line(tmp_path, case, capsys):
    content, problem = REFUSED[case]
    root = tmp_path / "hostile"
    root.mkdir()
    (root / "metadata.csv").write_text(content)
    with pytest.raises(DatasetError) as err:
        open_source(root, "train")
    message = str(err.value)
    assert message.startswith(f"{root / 'metadata.csv'}: ") and "\n" not in message
    assert re.search(problem, message), message
    assert main(["data", "inspect", str(root)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_two_metadata_files_refused(tmp_path):
    (tmp_path / "metadata.csv").write_text("file_name,label\na.png,x\n")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "label": "x"}\n')
    with pytest.raises(DatasetError, match="both metadata.csv and metadata.jsonl; keep one"):
        source_kind(tmp_path)


def test_class_folders_without_metadata_stay_an_image_folder(tmp_path):
    for label, name in enumerate(CLASSES):
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.png").write_bytes(picture(label, label))
    assert source_kind(tmp_path) == "folder"


def test_inspect(one_folder, split_folders, capsys):
    root, rows = one_folder
    report = inspect_source(root)
    assert report.images == len(rows) and report.classes == list(CLASSES)
    root = split_folders[0]
    assert main(["data", "inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{root}: splits train, test")
    assert f"{root / 'test' / 'metadata.jsonl'}: manifest, 3 classes, 6 images" in out


def test_trains_and_evaluates(split_folders, tmp_path, capsys):
    root, splits = split_folders
    run = tmp_path / "run"
    tiny = {"image_size": 8, "patch_size": 4, "width": 16, "depth": 1, "heads": 2}
    argv = ["train", "--data", str(root), "--max-steps", "2", "--batch-size", "4"]
    argv += ["--precision", "fp32", "--workers", "0", "--quiet", "--out", str(run)]
    assert main([*argv, *(f"--set={k}={v}" for k, v in tiny.items())]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(root), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == len(splits["test"])


def test_datasets_reads_the_same(split_folders, one_folder, tmp_path, monkeypatch):
    """`datasets.load_dataset("imagefolder")` as an oracle: the same files, order and labels."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    for root, parts in [(split_folders[0], ("train", "test")), (one_folder[0], ("train",))]:
        loaded = datasets.load_dataset("imagefolder", data_dir=str(root))
        assert list(loaded) == list(parts)
        whole = open_source(root, "train", val_fraction=0.5)
        for part in parts:
            rows = loaded[part].cast_column("image", datasets.Image(decode=False))
            source = open_source(root, part) if len(parts) > 1 else whole.source
            assert [Path(cell["path"]) for cell in rows["image"]] == [
                source.read(i) for i in range(len(source))
            ]
            assert list(rows["label"]) == [source.classes[k] for k in source.labels]
