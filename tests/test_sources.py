"""Map-style image sources for streamed training: CSV and JSON-lines manifests (paths relative
to the manifest, hostile rows refused in one line) and Hugging Face datasets (saved folders,
Parquet, their splits and columns), read in DataLoader workers as in the main process."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import ImageStream, load_image
from vitkit.data import hf as hf_module
from vitkit.data import manifest as manifest_module
from vitkit.data.dataset import DatasetError, split_indices
from vitkit.data.hf import open_hf
from vitkit.data.manifest import ManifestSource
from vitkit.data.preprocess import UnreadableImage


def picture(seed: int, fmt: str = "PNG") -> bytes:
    """An encoded picture of random pixels and size, each seed its own."""
    rng = np.random.default_rng(seed)
    h, w = (int(n) for n in rng.integers(24, 60, 2))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_images(root: Path, names: list[str]) -> list[Path]:
    """Files `names` under `root`, PNG and JPEG by their suffixes."""
    files = []
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(picture(i, "JPEG" if name.endswith(".jpg") else "PNG"))
        files.append(path)
    return files


def same_image(read: Path | io.BytesIO, original: Path | bytes) -> bool:
    if isinstance(original, bytes):
        original = io.BytesIO(original)
    return torch.equal(load_image(read, 3, 32), load_image(original, 3, 32))


# -- Manifests ----------------------------------------------------------------------------------


def test_csv_manifest(tmp_path):
    files = write_images(tmp_path, ["img/a.png", "img/b.jpg", "other/c.png", "d.jpg"])
    rows = [("img/a.png", "dog"), ("img/b.jpg", "cat"), ("./img/../other/c.png", "bird")]
    rows.append(("d.jpg", "cat"))
    # Windows line ends, a byte order mark, and a note over two lines in quotes.
    text = "\ufeffnote, path, label\r\n" + "".join(
        f'"row\n{i}","{p}", {c}\r\n' for i, (p, c) in enumerate(rows)
    )
    (tmp_path / "train.csv").write_text(text)
    source = ManifestSource.open(tmp_path / "train.csv")
    assert source.name == "train" and len(source) == 4
    assert source.classes == ["bird", "cat", "dog"]
    assert source.labels == [2, 1, 0, 1]
    for i, file in enumerate(files):
        assert source.read(i) == file and same_image(source.read(i), file)


def test_jsonl_manifest_with_numeric_classes(tmp_path):
    files = write_images(tmp_path / "data", ["x/0.png", "x/1.jpg", "y/2.png", "3.png"])
    labels = [10, "2", 2, "1"]  # an integer and its decimal string are one class
    lines = [
        json.dumps({"path": str(f.relative_to(tmp_path)), "label": c, "extra": [1]})
        for f, c in zip(files, labels, strict=True)
    ]
    (tmp_path / "all.ndjson").write_text("\n\n".join(lines) + "\n\n")
    source = ManifestSource.open(tmp_path / "all.ndjson")
    assert source.name == "all"
    assert source.classes == ["1", "2", "10"]  # as numbers, not as strings
    assert source.labels == [2, 1, 1, 0]
    for i, file in enumerate(files):
        assert same_image(source.read(i), file)


def test_manifest_with_given_classes(tmp_path):
    (tmp_path / "val.jsonl").write_text('{"path": "a.png", "label": "b"}\n')
    source = ManifestSource.open(tmp_path / "val.jsonl", classes=["a", "b", "c"])
    assert source.classes == ["a", "b", "c"] and source.labels == [1]
    with pytest.raises(DatasetError, match=r"val\.jsonl: label 'b' is not among the 2 classes"):
        ManifestSource.open(tmp_path / "val.jsonl", classes=["a", "c"])


REFUSED = {
    "escaping path": ("m.csv", "path,label\na.png,x\nsub/../../a.png,x\n", "line 3: .*leads out"),
    "escaping parent": ("m.jsonl", '{"path": "..", "label": "x"}\n', "line 1: .*leads out"),
    "absolute path": ("m.jsonl", '{"path": "/etc/passwd", "label": 1}\n', "line 1: .*absolute"),
    "missing column": ("m.csv", "file,label\na.png,x\n", "line 1: no 'path' column"),
    "missing key": ("m.jsonl", '{"path": "a.png"}\n', "line 1: no 'label' key"),
    "malformed JSON": ("m.jsonl", '{"path": "a.png", "label": 1}\n{"path":', "line 2: not valid"),
    "not an object": ("m.jsonl", '["a.png", 1]\n', "line 1: not a JSON object"),
    "path not a string": ("m.jsonl", '{"path": 5, "label": 1}\n', "line 1: .*not a string"),
    "boolean label": ("m.jsonl", '{"path": "a.png", "label": true}\n', "line 1: the label"),
    "empty label": ("m.csv", "path,label\na.png,\n", "line 2: the label '' is empty"),
    "short row": ("m.csv", "label,x,path\nb,c\n", "line 2: 2 fields, expected 3"),
    "empty file": ("m.csv", "", "empty"),
    "header only": ("m.csv", "path,label\n\n", "no rows"),
    "blank lines only": ("m.jsonl", "\n \n", "no rows"),
    "not UTF-8": ("m.csv", b"path,label\n\xff.png,x\n", "line 2: not UTF-8"),
    "wrong suffix": ("m.txt", "path,label\na.png,x\n", "not a manifest by its name"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_manifest_refusals(tmp_path, case):
    name, content, problem = REFUSED[case]
    path = tmp_path / "sets" / name
    path.parent.mkdir()
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError) as err:
        ManifestSource.open(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(problem, message), message


def test_manifest_bounds(tmp_path, monkeypatch):
    """Rows, classes, row length and file size are bounded before they are taken in."""
    path = tmp_path / "m.csv"
    path.write_text("path,label\n" + "".join(f"{i}.png,{i % 3}\n" for i in range(6)))
    assert len(ManifestSource.open(path)) == 6
    for constant, problem in [
        ("MAX_ROWS", "line 7: more than 5 rows"),
        ("MAX_CLASSES", "line 4: more than 2 classes"),
        ("MAX_ROW_BYTES", "line 1: a row longer than 5"),
    ]:
        with monkeypatch.context() as m:
            m.setattr(manifest_module, constant, {"MAX_CLASSES": 2}.get(constant, 5))
            with pytest.raises(DatasetError, match=f"^{path}: {problem}"):
                ManifestSource.open(path)
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 40)
    with pytest.raises(DatasetError, match=f"^{path}: larger than"):
        ManifestSource.open(path)


def test_manifest_names_are_printable(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"path": "/a\n\x1b[2Jfake line", "label": "x"}) + "\n")
    with pytest.raises(DatasetError) as err:
        ManifestSource.open(path)
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)


# -- Hugging Face datasets ----------------------------------------------------------------------

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """`datasets`, with its cache (where Parquet is converted) in this test's folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


def image_dataset(hf, n: int, offset: int = 0, **extra):
    """`n` rows of PNG and JPEG pictures with ClassLabel labels, and `extra` columns."""
    features = hf.Features(
        {"image": hf.Image(), "label": hf.ClassLabel(names=CLASSES)}
        | {k: feature for k, (feature, _) in extra.items()}
    )
    rows = {
        "image": [
            {"bytes": picture(offset + i, "JPEG" if i % 2 else "PNG"), "path": None}
            for i in range(n)
        ],
        "label": [(i * 7) % 3 for i in range(n)],
    } | {k: values for k, (_, values) in extra.items()}
    return hf.Dataset.from_dict(rows, features=features)


def encoded(data, column: str = "image") -> list[bytes]:
    undecoded = data.cast_column(column, type(data.features[column])(decode=False))
    return [cell["bytes"] for cell in undecoded[column]]


def check_source(source, labels: list[int], images: list[bytes]) -> None:
    assert len(source) == len(labels)
    assert source.labels == labels
    for i, original in enumerate(images):
        read = source.read(i)
        assert isinstance(read, io.BytesIO) and "[" in read.name
        assert same_image(read, original)


def test_hf_dataset_dict_splits(hf, tmp_path):
    train, test = image_dataset(hf, 9), image_dataset(hf, 4, offset=100)
    hf.DatasetDict(train=train, test=test).save_to_disk(tmp_path / "pets")
    source = open_hf(tmp_path / "pets", "train")
    assert source.classes == CLASSES and source.name == "pets"
    check_source(source, train["label"][:], encoded(train))
    assert source.read(3).name == "pets[train][3]"
    for split in ("val", "test"):  # "val" falls back on the test split
        check_source(open_hf(str(tmp_path / "pets"), split), test["label"][:], encoded(test))
    with pytest.raises(DatasetError, match="pets: has splits train, test; ask for"):
        open_hf(tmp_path / "pets", "all")


def test_hf_validation_and_test_splits(hf, tmp_path):
    parts = {
        name: image_dataset(hf, 3, offset=10 * k)
        for k, name in enumerate(["train", "validation", "test"])
    }
    hf.DatasetDict(parts).save_to_disk(tmp_path / "three")
    for split, part in [("train", "train"), ("val", "validation"), ("test", "test")]:
        source = open_hf(tmp_path / "three", split)
        check_source(source, parts[part]["label"][:], encoded(parts[part]))
        assert source.read(0).name == f"three[{part}][0]"


def test_hf_single_dataset_split_by_fraction(hf, tmp_path):
    data = image_dataset(hf, 20)
    data.save_to_disk(tmp_path / "one")
    labels, images = data["label"][:], encoded(data)
    for split, subset in [("train", "train"), ("val", "val"), ("test", "val"), ("all", "all")]:
        source = open_hf(tmp_path / "one", split, val_fraction=0.3, seed=5)
        keep = split_indices(labels, subset, 0.3, 5)
        assert 0 < len(keep) <= 20 and (subset == "all") == (len(keep) == 20)
        check_source(source, [labels[i] for i in keep], [images[i] for i in keep])


def test_hf_parquet(hf, tmp_path):
    train, test = image_dataset(hf, 6), image_dataset(hf, 4, offset=50)
    train.to_parquet(str(tmp_path / "pets.parquet"))
    source = open_hf(tmp_path / "pets.parquet", "train", val_fraction=0.5)
    keep = split_indices(train["label"][:], "train", 0.5, 0)
    assert source.name == "pets" and source.classes == CLASSES  # ClassLabel kept in Parquet
    check_source(source, [train["label"][i] for i in keep], [encoded(train)[i] for i in keep])
    # A folder of Parquet files named by their splits, as on the Hub.
    (tmp_path / "folder").mkdir()
    train.to_parquet(str(tmp_path / "folder" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(tmp_path / "folder" / "test-00000-of-00001.parquet"))
    check_source(open_hf(tmp_path / "folder", "train"), train["label"][:], encoded(train))
    check_source(open_hf(tmp_path / "folder", "val"), test["label"][:], encoded(test))
    glob = open_hf(str(tmp_path / "folder" / "*.parquet"), "all")
    assert len(glob) == 10 and glob.name == "folder"


def test_hf_columns_by_type_and_by_name(hf, tmp_path):
    n = 6
    species = ["owl", "bat", "owl", "emu", "bat", "owl"]
    data = image_dataset(
        hf,
        n,
        photo=(hf.Image(), [{"bytes": picture(200 + i), "path": None} for i in range(n)]),
        species=(hf.Value("string"), species),
        labels=(hf.Value("int32"), [10, 2, 1, 2, 10, 1]),
    )
    data.save_to_disk(tmp_path / "zoo")
    auto = open_hf(tmp_path / "zoo", "all")  # the first Image and the first ClassLabel
    check_source(auto, data["label"][:], encoded(data))
    named = open_hf(tmp_path / "zoo", "all", image_column="photo", label_column="species")
    assert named.classes == ["bat", "emu", "owl"]
    check_source(named, [named.classes.index(s) for s in species], encoded(data, "photo"))
    numbers = open_hf(tmp_path / "zoo", "all", label_column="labels")
    assert numbers.classes == ["1", "2", "10"] and numbers.labels == [2, 1, 0, 1, 2, 0]
    for kwargs, problem in [
        ({"image_column": "picture"}, "column 'picture' does not exist"),
        ({"image_column": "species"}, "column 'species' is not an image column"),
        ({"label_column": "photo"}, "column 'photo' is not a label column"),
        ({"label_column": "kind"}, "column 'kind' does not exist"),
    ]:
        with pytest.raises(DatasetError) as err:
            open_hf(tmp_path / "zoo", "all", **kwargs)
        message = str(err.value)
        assert message.startswith(f"zoo: {problem}; its columns: image (image), label ")
        assert "species (string)" in message and "\n" not in message


def test_hf_plain_parquet_paths_and_bounds(hf, tmp_path, monkeypatch):
    """Parquet from other tools: images as {bytes, path} structs, labels as strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = write_images(tmp_path / "files", ["a.png", "b.jpg"])
    images = [{"bytes": picture(7), "path": "x.png"}, {"bytes": None, "path": str(files[1])}]
    pq.write_table(pa.table({"label": ["b", "a"], "img": images}), tmp_path / "plain.parquet")
    source = open_hf(tmp_path / "plain.parquet", "all")
    assert source.classes == ["a", "b"] and source.labels == [1, 0]
    assert same_image(source.read(0), picture(7))
    assert source.read(1) == files[1]  # no bytes: the file it names
    monkeypatch.setattr(hf_module, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(UnreadableImage, match=r"plain\[train\]\[0\]: cannot read image: .* over"):
        source.read(0)


def test_hf_unlabelled_rows_and_unknown_specs(hf, tmp_path):
    data = image_dataset(hf, 4)
    data = data.map(lambda row, i: {"label": -1 if i == 2 else row["label"]}, with_indices=True)
    data.save_to_disk(tmp_path / "hidden")
    with pytest.raises(DatasetError, match=r"^hidden\[2\]: 'label' is not one of the classes$"):
        open_hf(tmp_path / "hidden", "all")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: neither a dataset saved by save_to_disk"):
        open_hf(tmp_path / "empty", "train")
    with pytest.raises(DatasetError, match="nowhere.csv: not a saved dataset"):
        open_hf(tmp_path / "nowhere.csv", "train")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{")
    with pytest.raises(DatasetError, match=r"broken: cannot load: ") as err:
        open_hf(tmp_path / "broken", "train")
    assert "\n" not in str(err.value)


def test_hf_without_datasets_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DatasetError, match=r"pip install 'vitkit\[hf\]'"):
        open_hf(tmp_path, "train")


def test_hf_stream_in_worker_processes(hf, tmp_path):
    data = image_dataset(hf, 12)
    hf.DatasetDict(train=data, test=image_dataset(hf, 2)).save_to_disk(tmp_path / "pets")
    source = open_hf(tmp_path / "pets", "train")
    order = list(range(len(source)))
    batches = {
        workers: list(ImageStream(source, 32, 3, workers=workers).batches(0, order, size=4))
        for workers in (0, 2)
    }
    assert len(batches[0]) == 3
    for (images0, labels0), (images2, labels2) in zip(batches[0], batches[2], strict=True):
        assert torch.equal(images0, images2) and torch.equal(labels0, labels2)
    expected = torch.stack([load_image(io.BytesIO(b), 3, 32) for b in encoded(data)])
    assert torch.equal(torch.cat([images for images, _ in batches[2]]), expected)
    assert torch.cat([labels for _, labels in batches[2]]).tolist() == data["label"][:]


def test_inspect_reports_a_manifest_and_a_saved_dataset(tmp_path):
    from vitkit.data.inspect import inspect_source

    files = write_images(tmp_path / "m", ["a/0.png", "a/1.jpg", "b/2.png"])
    (tmp_path / "m" / "b" / "bad.png").write_bytes(b"not an image")
    rows = [f"{f.relative_to(tmp_path / 'm')},{f.parent.name}" for f in files]
    (tmp_path / "m" / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\nb/bad.png,b\n")
    report = inspect_source(tmp_path / "m" / "list.csv")
    assert (report.kind, report.classes, report.counts) == ("manifest", ["a", "b"], [2, 1])
    assert [Path(where).name for where, _ in report.unreadable] == ["bad.png"]

    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b"])}
    )
    data = {"img": [{"bytes": picture(i), "path": None} for i in range(5)], "y": [0, 1, 1, 0, 1]}
    split = datasets.Dataset.from_dict(data, features=features)
    datasets.DatasetDict({"train": split, "test": split.select([0, 1])}).save_to_disk(
        tmp_path / "d"
    )
    report = inspect_source(tmp_path / "d")
    assert report.kind == "splits" and list(report.splits) == ["train", "val"]
    assert report.splits["train"].counts == [2, 3] and report.splits["val"].counts == [1, 1]
    assert report.splits["train"].formats == {"PNG": 5}
