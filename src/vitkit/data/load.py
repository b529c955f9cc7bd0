"""`load_dataset`: one split of a named dataset, a folder of IDX files or an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from vitkit.data.dataset import DatasetError, ImageDataset
from vitkit.data.digits import load_digits
from vitkit.data.folder import find_classes, load_image_folder
from vitkit.data.idx import KNOWN, is_idx_dir, load_idx, load_idx_dir
from vitkit.data.preprocess import resize, to_float
from vitkit.data.stream import FolderSource, ImageStream, RandomResizedCrop

DATASETS = ("fashion-mnist", "mnist", "digits")


def load_dataset(
    spec: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> ImageDataset:
    """Load one split of a named dataset (see `DATASETS`) or of an image folder.

    Named datasets, and folders of IDX files, have splits "train" and "test" ("val" is
    accepted for "test", their only held-out split); `data_dir` says where a named dataset's
    files are, if not in the usual places. A folder with `train/` and `val/` or `test/`
    subfolders uses them; any other folder (or a lone `train/` in it) holds one subfolder per
    class and is split by `val_fraction` (stratified, fixed `seed`) into "train" and "val"
    ("test" is accepted for "val"). Images come back with `channels` channels (grey is
    repeated, colour becomes luma) at `image_size` x `image_size`; left out, named datasets
    keep theirs and folders become 3 x 224 x 224.
    """
    if spec in KNOWN:
        ds = load_idx(spec, _held_out_as_test(spec, split), data_dir)
    elif spec == "digits":
        ds = load_digits(_held_out_as_test(spec, split))
    elif Path(spec).is_dir() and is_idx_dir(spec):
        ds = load_idx_dir(spec, _held_out_as_test(spec, split))
    elif Path(spec).is_dir():
        return _load_folder_split(Path(spec), split, image_size, channels, val_fraction, seed)
    else:
        raise DatasetError(
            f"unknown dataset {spec!r}: neither one of {', '.join(DATASETS)} nor a directory"
        )
    return _conform(ds, image_size, channels)


def _held_out_as_test(spec: str, split: str) -> str:
    if split not in ("train", "test", "val"):
        raise DatasetError(f"{spec} has splits 'train' and 'test', not {split!r}")
    return "test" if split == "val" else split


def _load_folder_split(
    root: Path,
    split: str,
    image_size: int | None,
    channels: int | None,
    val_fraction: float,
    seed: int,
) -> ImageDataset:
    size, chans, name = image_size or 224, channels or 3, root.name
    directory, classes, subset = folder_layout(root, split)
    return load_image_folder(
        directory,
        chans,
        size,
        classes=classes,
        subset=subset,
        val_fraction=val_fraction,
        seed=seed,
        name=name,
    )


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
        if split not in ("val", "test"):
            raise DatasetError(f"{root} has splits train and val/test, not {split!r}")
        held_out = root / split if (root / split).is_dir() else held_out_dirs[0]
        return held_out, find_classes(train_dir), "all"
    if train_dir.is_dir():
        root = train_dir  # a train/ folder alone is split by fraction, like a plain folder
    if split not in ("train", "val", "test"):
        raise DatasetError(f"{root} is split by fraction into 'train' and 'val', not {split!r}")
    return root, None, "train" if split == "train" else "val"


def stream_folder(
    root: str | Path,
    split: str,
    image_size: int,
    channels: int,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    crop: RandomResizedCrop | None = None,
    crop_seed: int = 0,
    workers: int | None = None,
) -> ImageStream:
    """A split of an image folder (laid out, and split by `val_fraction` and `seed`, as
    `load_dataset` does), streamed from its files: listed now, decoded batch by batch (see
    `vitkit.data.stream`); `crop_seed` seeds the random crops."""
    root = Path(root)
    directory, classes, subset = folder_layout(root, split)
    source = FolderSource.open(
        directory, classes=classes, subset=subset, val_fraction=val_fraction, seed=seed
    )
    source.name = root.name
    return ImageStream(source, image_size, channels, crop, crop_seed, workers)


def _conform(ds: ImageDataset, image_size: int | None, channels: int | None) -> ImageDataset:
    """Convert a loaded dataset's images to the channels and size a model expects."""
    images = ds.images
    if channels is not None and channels != images.shape[1]:
        if channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1).contiguous()
        elif channels == 1 and images.shape[1] == 3:
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images * luma).sum(1, keepdim=True).round().to(torch.uint8)
        else:
            raise DatasetError(f"cannot convert {images.shape[1]}-channel images to {channels}")
    if image_size is not None and image_size != images.shape[-1]:
        # In chunks: a float copy of the whole upsampled dataset may not fit in memory.
        out = torch.empty((*images.shape[:2], image_size, image_size), dtype=torch.uint8)
        for start in range(0, len(images), 1024):
            chunk = to_float(images[start : start + 1024])
            chunk = resize(chunk, image_size)
            out[start : start + 1024] = chunk.mul_(255).round_().to(torch.uint8)
        images = out
    if images is ds.images:
        return ds
    return ImageDataset(images, ds.labels, ds.classes, ds.name, ds.skipped)
