"""A dataset in memory: uint8 images, labels and class names; splits and statistics of it,
and the sample of it that a trained model keeps for int8 calibration."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Images the int8 calibration looks at; more changes the scales little and costs time.
CALIBRATION_IMAGES = 128
CALIBRATION_BYTES = 8_000_000


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


def split_indices(labels: list[int], subset: str, val_fraction: float, seed: int) -> list[int]:
    """The indices of `subset` ("train", "val" or "all") of `stratified_split(labels,
    val_fraction, seed)`: one split for every kind of source."""
    if subset == "all":
        return list(range(len(labels)))
    if subset not in ("train", "val"):
        raise ValueError(f"subset must be 'train', 'val' or 'all', not {subset!r}")
    train, val = stratified_split(torch.tensor(labels, dtype=torch.int64), val_fraction, seed)
    return (train if subset == "train" else val).tolist()


def dataset_stats(ds: ImageDataset | torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of the pixels of a dataset or of
    uint8 images (N, C, H, W), in [0, 1] units.

    Exact and cheap: a 256-bin histogram per channel, no float copy of the images.
    """
    images = ds.images if isinstance(ds, ImageDataset) else ds
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        p = counts / counts.sum()
        mean = float((p * values).sum())
        var = float((p * (values - mean) ** 2).sum())
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)


def calibration_sample(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed random subset of uint8 training images to keep with a trained model: up to
    CALIBRATION_IMAGES of them and about CALIBRATION_BYTES (at least 16)."""
    per_image = images[0].numel() * images.element_size()
    n = min(len(images), CALIBRATION_IMAGES, max(16, CALIBRATION_BYTES // per_image))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:n]].cpu().clone()
