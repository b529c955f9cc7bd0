"""Where a collection's images come from: one `Source` per split of an image folder, a
CSV / JSON-lines manifest, a WebDataset shard set or a Hugging Face dataset.

    open_source("photos/", "train")                   one subfolder per class (or train/, val/)
    open_source("labels.csv", "val")                  path,label rows, split by fraction
    open_source("hf-folder/", "val")                  metadata.csv (or train/, validation/ ones)
    open_source("shards/", "train")                   shards.json (or train/ and val/ sets)
    open_source("shards-{000000..000127}.tar", "train")
    open_source("https://host/set/shards.json", "train")   fetched once (`shard_fetch.py`)
    open_source("saved/", "val")                      Dataset(Dict).save_to_disk, or Parquet
    open_source("hf:owner/name", "train")             a hub dataset (online)

A source lists its images (it decodes none); `load.py` decodes one into memory or streams it.
Named datasets (Fashion-MNIST, digits...) and folders of IDX files are not sources: they are
small, and always in memory. A source without its own held-out split is split by fraction, the
same way for every kind (`split_indices`): "val" and "test" both name the held-out part.

A folder with Hugging Face's imagefolder metadata (`metadata.csv` or `metadata.jsonl` of
file_name and label, in it or in its train/ and validation/, val/ or test/ folders) is read as
the manifest it is, without `datasets` and its Arrow cache; its subfolders are not classes then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vitkit.data.dataset import DatasetError
from vitkit.data.folder import find_classes
from vitkit.data.hf import HUB_PREFIX, SAVED_FILES, open_hf
from vitkit.data.idx import is_idx_dir
from vitkit.data.manifest import ManifestSource, metadata_file
from vitkit.data.shard_fetch import fetch_shards, is_remote
from vitkit.data.shard_source import open_shards
from vitkit.data.shards import MANIFEST
from vitkit.data.stream import FolderSource, Source, split_source

Kind = Literal["folder", "manifest", "shards", "hf"]
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json-lines", ".ndjson")
HELD_OUT = ("val", "test")
# An imagefolder's split folders with metadata, and the held-out one each request prefers, in
# order (as for a Hugging Face dataset's splits).
METADATA_SPLITS = ("train", "validation", "val", "test")
_HELD_OUT_FOLDERS = {"val": ("validation", "val", "test"), "test": ("test", "validation", "val")}


def source_kind(spec: str | Path) -> Kind | None:
    """What kind of source `spec` names, or None (a named dataset, IDX files, nothing)."""
    text, path = str(spec), Path(spec)
    if text.startswith(HUB_PREFIX):
        return "hf"
    if is_remote(spec):
        return "shards"
    if path.is_dir():
        if is_idx_dir(path):
            return None
        if (path / MANIFEST).is_file() or (path / "train" / MANIFEST).is_file():
            return "shards"
        if any((path / f).is_file() for f in SAVED_FILES) or any(path.glob("*.parquet")):
            return "hf"
        return "manifest" if metadata_files(path) else "folder"
    suffix = path.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return "manifest"
    if suffix == ".parquet" or (suffix == "" and "*" in text):
        return "hf"
    if suffix in (".tar", ".json") or "{" in text:
        return "shards"
    return None


def open_source(
    spec: str | Path,
    split: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
) -> Source:
    """Split `split` ("train", "val" or "test") of the collection `spec` names."""
    kind = source_kind(spec)
    if kind is None:
        raise DatasetError(f"{spec}: not an image folder, manifest, shard set or HF dataset")
    if split not in ("train", *HELD_OUT):
        raise DatasetError(f"{spec} has splits 'train' and 'val' (or 'test'), not {split!r}")
    subset = "train" if split == "train" else "val"
    if kind == "hf":
        return open_hf(
            spec,
            split,
            image_column=image_column,
            label_column=label_column,
            val_fraction=val_fraction,
            seed=seed,
        )
    if kind == "folder":
        directory, classes, part = folder_layout(Path(spec), split)
        source = FolderSource.open(
            directory, classes=classes, subset=part, val_fraction=val_fraction, seed=seed
        )
        source.name = Path(spec).name
        return source
    if kind == "manifest":
        return _open_manifest(Path(spec), split, label_column, val_fraction, seed)
    name = None
    if is_remote(spec):
        spec, name = fetch_shards(str(spec))
    path = Path(spec)
    if path.is_dir() and (path / "train" / MANIFEST).is_file():
        held_out = [path / s for s in (split, *HELD_OUT) if (path / s / MANIFEST).is_file()]
        if split == "train" or held_out:
            return open_shards(path / "train" if split == "train" else held_out[0], path.name)
        path = path / "train"  # a train/ set alone is split by fraction, like a folder
    return split_source(open_shards(path, name), subset, val_fraction, seed)


def _open_manifest(
    path: Path, split: str, label_column: str | None, val_fraction: float, seed: int
) -> Source:
    """A split of a manifest, or of an imagefolder by its metadata files (`metadata_files`),
    a held-out folder's with the training folder's classes."""
    files = metadata_files(path) if path.is_dir() else {"all": path}
    source = ManifestSource.open(files.get("all") or files["train"], label_column=label_column)
    if "train" in files and split != "train":
        held_out = next(files[s] for s in _HELD_OUT_FOLDERS[split] if s in files)
        source = ManifestSource.open(held_out, classes=source.classes, label_column=label_column)
    if path.is_dir():
        source.name = path.name  # the collection's, not "metadata"
    subset = "all" if "train" in files else "train" if split == "train" else "val"
    return split_source(source, subset, val_fraction, seed)


def metadata_files(root: Path) -> dict[str, Path]:
    """The metadata files of a Hugging Face imagefolder by split: "train" and each held-out
    folder's ("validation", "val", "test") where `train/` and one of those have them; else
    {"all": the root's, or a lone `train/`'s}; else none (not such a folder)."""
    found = {s: f for s in METADATA_SPLITS if (f := metadata_file(root / s)) is not None}
    if "train" in found and len(found) > 1:
        return found
    alone = metadata_file(root) or found.get("train")
    return {"all": alone} if alone is not None else {}


def folder_layout(
    root: Path, split: str
) -> tuple[Path, list[str] | None, Literal["all", "train", "val"]]:
    """Where a split of an image folder lies: (directory, its class names if they are fixed by
    a training folder, the part of a fraction split it is or "all").

    A folder with `train/` and `val/` or `test/` uses them ("val" and "test" each prefer their
    own folder and fall back on the other); any other folder (or a lone `train/` in it) is
    split by fraction into "train" and "val" ("test" is taken for "val")."""
    train_dir = root / "train"
    held_out_dirs = [d for d in (root / "val", root / "test") if d.is_dir()]
    if train_dir.is_dir() and held_out_dirs:
        if split == "train":
            return train_dir, None, "all"
        if split not in HELD_OUT:
            raise DatasetError(f"{root} has splits train and val/test, not {split!r}")
        held_out = root / split if (root / split).is_dir() else held_out_dirs[0]
        return held_out, find_classes(train_dir), "all"
    if train_dir.is_dir():
        root = train_dir  # a train/ folder alone is split by fraction, like a plain folder
    if split not in ("train", *HELD_OUT):
        raise DatasetError(f"{root} is split by fraction into 'train' and 'val', not {split!r}")
    return root, None, "train" if split == "train" else "val"
