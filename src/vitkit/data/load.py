"""`load_dataset`: one split of a named dataset, a folder of IDX files, or a collection
(image folder, manifest, shards, HF dataset) decoded into memory; `stream_source`: a
collection's split streamed from its files."""

from __future__ import annotations

from pathlib import Path

import torch

from vitkit.data.dataset import DatasetError, ImageDataset
from vitkit.data.digits import load_digits
from vitkit.data.folder import load_image_folder
from vitkit.data.idx import KNOWN, is_idx_dir, load_idx, load_idx_dir
from vitkit.data.preprocess import resize, to_float
from vitkit.data.sample_augment import SampleAugment
from vitkit.data.sources import folder_layout, open_source, source_kind
from vitkit.data.stream import ImageStream, RandomResizedCrop, decode_all

DATASETS = ("fashion-mnist", "mnist", "digits")


def load_dataset(
    spec: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    crop_pct: float = 1.0,
) -> ImageDataset:
    """Load one split of a named dataset (see `DATASETS`) or of a collection (`sources.py`).

    Named datasets, and folders of IDX files, have splits "train" and "test" ("val" is
    accepted for "test", their only held-out split); `data_dir` says where a named dataset's
    files are, if not in the usual places. A folder with `train/` and `val/` or `test/`
    subfolders uses them; any other folder (or a lone `train/` in it) holds one subfolder per
    class and is split by `val_fraction` (stratified, fixed `seed`) into "train" and "val"
    ("test" is accepted for "val"); other collections split alike. Images come back with
    `channels` channels (grey is repeated, colour becomes luma) at `image_size` x
    `image_size`; left out, named datasets keep theirs and collections become 3 x 224 x 224,
    each image of a collection the centre crop of `crop_pct` (see `centre_crop`).
    """
    if spec in KNOWN:
        ds = load_idx(spec, _held_out_as_test(spec, split), data_dir)
    elif spec == "digits":
        ds = load_digits(_held_out_as_test(spec, split))
    elif Path(spec).is_dir() and is_idx_dir(spec):
        ds = load_idx_dir(spec, _held_out_as_test(spec, split))
    elif source_kind(spec) == "folder":
        directory, classes, subset = folder_layout(Path(spec), split)
        return load_image_folder(
            directory,
            channels or 3,
            image_size or 224,
            classes=classes,
            subset=subset,
            val_fraction=val_fraction,
            seed=seed,
            name=Path(spec).name,
            crop_pct=crop_pct,
        )
    elif source_kind(spec) is not None:
        source = open_source(spec, split, val_fraction=val_fraction, seed=seed)
        return decode_all(source, image_size or 224, channels or 3, crop_pct=crop_pct)
    else:
        raise DatasetError(
            f"unknown dataset {spec!r}: not one of {', '.join(DATASETS)}, an image folder, "
            "a manifest (.csv, .jsonl), WebDataset shards or a Hugging Face dataset"
        )
    return _conform(ds, image_size, channels)


def _held_out_as_test(spec: str, split: str) -> str:
    if split not in ("train", "test", "val"):
        raise DatasetError(f"{spec} has splits 'train' and 'test', not {split!r}")
    return "test" if split == "val" else split


def stream_source(
    spec: str | Path,
    split: str,
    image_size: int,
    channels: int,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    crop: RandomResizedCrop | None = None,
    crop_seed: int = 0,
    workers: int | None = None,
    crop_pct: float = 1.0,
    augment: SampleAugment | None = None,
) -> ImageStream:
    """A split of an image folder, manifest, shard set or HF dataset (split by `val_fraction`
    and `seed` as `load_dataset` splits), streamed: listed now, decoded batch by batch (see
    `vitkit.data.stream`); `crop_seed` seeds the random crops and `augment`, without which
    each image is its centre crop of `crop_pct`."""
    source = open_source(spec, split, val_fraction=val_fraction, seed=seed)
    return ImageStream(
        source, image_size, channels, crop, crop_seed, workers, crop_pct, augment=augment
    )


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
