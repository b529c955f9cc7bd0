"""Image-caption pairs for contrastive (CLIP, LiT) training, in memory.

Two sources: a folder of images with a caption file beside each (`photo.jpg` + `photo.txt`,
one caption per line; images without one are left out and counted), or a labelled dataset
whose class names become captions through prompt templates ("a photo of a {}.").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vitkit.data.dataset import DatasetError, ImageDataset
from vitkit.data.preprocess import centre_crop, image_extensions, load_image

# A caption file is a few lines of text; anything larger is not one.
MAX_CAPTION_BYTES = 64 * 2**10
MAX_CAPTIONS_PER_IMAGE = 100
MAX_PAIRS = 10_000_000


@dataclass
class CaptionedImages:
    """uint8 images (N, C, H, W), each with one or more captions (and its class, if any)."""

    images: torch.Tensor
    captions: list[list[str]]
    name: str = ""
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions) or not all(self.captions):
            raise ValueError("every image needs at least one caption")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: torch.Tensor) -> CaptionedImages:
        labels = None if self.labels is None else self.labels[indices]
        captions = [self.captions[i] for i in indices.tolist()]
        return CaptionedImages(self.images[indices], captions, self.name, labels, self.classes)


def captions_from_labels(
    dataset: ImageDataset,
    templates: Sequence[str],
    classes: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> CaptionedImages:
    """Each image captioned by its class name in every template; with `classes`, only the
    images of those classes are kept (their labels stay the dataset's indices). `names`
    replaces the dataset's class names in the captions, in its class order."""
    names = list(names) if names is not None else dataset.classes
    if len(names) != len(dataset.classes):
        raise ValueError(f"{len(names)} names for {len(dataset.classes)} classes")
    keep = torch.ones(len(dataset), dtype=torch.bool)
    if classes is not None:
        unknown = [c for c in classes if c not in dataset.classes]
        if unknown:
            raise ValueError(
                f"no class {unknown[0]!r} in {dataset.name or 'the dataset'}; its classes: "
                f"{', '.join(dataset.classes)}"
            )
        wanted = torch.tensor([dataset.classes.index(c) for c in classes])
        keep = torch.isin(dataset.labels, wanted)
    index = keep.nonzero().flatten()
    per_class = [[t.replace("{}", name) for t in templates] for name in names]
    captions = [per_class[i] for i in dataset.labels[index].tolist()]
    return CaptionedImages(
        dataset.images[index], captions, dataset.name, dataset.labels[index], dataset.classes
    )


def load_captioned_folder(
    directory: str | Path, image_size: int, channels: int, crop_pct: float = 1.0
) -> CaptionedImages:
    """The images under `directory` that have a caption file beside them, decoded and cropped
    to `image_size`; unreadable images and caption files are skipped with their reason."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory")
    extensions = image_extensions()
    files = sorted(
        f
        for f in directory.rglob("*")
        if f.suffix.lower() in extensions
        and not any(p.startswith(".") for p in f.relative_to(directory).parts)
    )
    if len(files) > MAX_PAIRS:
        raise DatasetError(f"{directory}: {len(files):,} images, more than {MAX_PAIRS:,}")
    images, captions, skipped = [], [], []
    crop = centre_crop(crop_pct)
    for path in tqdm(files, desc="captioned images", unit="img", delay=2.0):
        try:
            lines = read_captions(path.with_suffix(".txt"))
            image = load_image(path, channels, image_size, "bicubic", crop=crop)
        except DatasetError as e:
            skipped.append((str(path), str(e)))
            continue
        images.append(image)
        captions.append(lines)
    if not images:
        first = f": {skipped[0][1]}" if skipped else ""
        raise DatasetError(f"{directory}: no image with a caption file beside it{first}")
    batch = torch.stack(images)
    return CaptionedImages(batch, captions, directory.name, skipped=skipped)


def read_captions(path: Path) -> list[str]:
    """The non-blank lines of a caption file, bounded in size and count."""
    try:
        size = path.stat().st_size
        if size > MAX_CAPTION_BYTES:
            raise DatasetError(f"{path}: {size:,} bytes, more than {MAX_CAPTION_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no caption file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: unreadable caption file: {e}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DatasetError(f"{path}: an empty caption file")
    return lines[:MAX_CAPTIONS_PER_IMAGE]
