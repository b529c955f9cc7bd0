"""Data: every dataset becomes uint8 image tensors in memory, plus labels and class names.

Small datasets (MNIST-sized, scikit-learn digits, modest image folders) are held as one
(N, C, H, W) uint8 tensor so that a training step does no per-image Python work; batches are
augmented and normalised as whole tensors (see transforms.py).

    load_dataset("fashion-mnist", "train")        IDX files (idx.py), checksummed
    load_dataset("digits", "test")                scikit-learn's 8x8 digits (digits.py)
    load_dataset("photos/", "val", image_size=32) one subfolder per class (folder.py)
    load_dataset("kmnist/", "test")               a folder of IDX files (idx.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


class DatasetError(ValueError):
    """A dataset that is missing, malformed, or not the data it claims to be."""


@dataclass
class ImageDataset:
    """Images (N, C, H, W) uint8, labels (N,) int64, one name per class.

    `skipped` lists the (path, reason) of source files that could not be read, if any.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.labels.shape[0]} labels for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        """The images at `indices`, with the same classes and name."""
        return ImageDataset(
            self.images[indices], self.labels[indices], self.classes, self.name, self.skipped
        )


def stratified_split(
    labels: torch.Tensor, fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out), holding out `fraction` of every class, reproducible by `seed`.

    Both index tensors are sorted, so a split keeps the original order of the data.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        n = round(len(members) * fraction)
        held.append(members[torch.randperm(len(members), generator=gen)[:n]])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    if held:
        mask[torch.cat(held)] = True
    return (~mask).nonzero().flatten(), mask.nonzero().flatten()


def dataset_stats(ds: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of the pixels, in [0, 1] units.

    Exact and cheap: a 256-bin histogram per channel, no float copy of the images.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(ds.channels):
        counts = torch.bincount(ds.images[:, c].reshape(-1), minlength=256).double()
        p = counts / counts.sum()
        mean = float((p * values).sum())
        var = float((p * (values - mean) ** 2).sum())
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)


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
    if spec in idx.KNOWN:
        ds = idx.load_idx(spec, _held_out_as_test(spec, split), data_dir)
    elif spec == "digits":
        ds = digits.load_digits(_held_out_as_test(spec, split))
    elif Path(spec).is_dir() and idx.is_idx_dir(spec):
        ds = idx.load_idx_dir(spec, _held_out_as_test(spec, split))
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
    train_dir = root / "train"
    held_out_dirs = [d for d in (root / "val", root / "test") if d.is_dir()]
    if train_dir.is_dir() and held_out_dirs:
        if split == "train":
            return folder.load_image_folder(train_dir, chans, size, name=name)
        if split not in ("val", "test"):
            raise DatasetError(f"{root} has splits train and val/test, not {split!r}")
        # "val" and "test" each prefer their own folder and fall back on the other one.
        held_out = root / split if (root / split).is_dir() else held_out_dirs[0]
        classes = folder.find_classes(train_dir)
        return folder.load_image_folder(held_out, chans, size, classes=classes, name=name)
    if train_dir.is_dir():
        root = train_dir  # a train/ folder alone is split by fraction, like a plain folder
    if split not in ("train", "val", "test"):
        raise DatasetError(f"{root} is split by fraction into 'train' and 'val', not {split!r}")
    subset = "train" if split == "train" else "val"  # the folder's only held-out part
    return folder.load_image_folder(
        root, chans, size, subset=subset, val_fraction=val_fraction, seed=seed, name=name
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
            chunk = transforms.to_float(images[start : start + 1024])
            chunk = transforms.resize(chunk, image_size)
            out[start : start + 1024] = chunk.mul_(255).round_().to(torch.uint8)
        images = out
    if images is ds.images:
        return ds
    return ImageDataset(images, ds.labels, ds.classes, ds.name, ds.skipped)


# The loaders import the types above from this package, so they come after them.
from vitkit.data import digits, folder, idx, transforms  # noqa: E402
from vitkit.data.digits import load_digits  # noqa: E402
from vitkit.data.folder import load_image, load_image_folder, split_image_folder  # noqa: E402
from vitkit.data.idx import load_idx, load_idx_dir, read_idx  # noqa: E402
from vitkit.data.transforms import (  # noqa: E402
    AugmentConfig,
    TrainTransform,
    mix,
    normalize,
    to_float,
)

__all__ = [
    "DATASETS",
    "AugmentConfig",
    "DatasetError",
    "ImageDataset",
    "TrainTransform",
    "dataset_stats",
    "load_dataset",
    "load_digits",
    "load_idx",
    "load_idx_dir",
    "load_image",
    "load_image_folder",
    "mix",
    "normalize",
    "read_idx",
    "split_image_folder",
    "stratified_split",
    "to_float",
]
