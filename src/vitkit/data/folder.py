"""Image folders: one subfolder per class, each image decoded once into memory by the rules
of `vitkit.data.preprocess.load_image`; unreadable files are skipped and reported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from vitkit.data.dataset import DatasetError, ImageDataset, split_indices
from vitkit.data.preprocess import (
    Crop,
    UnreadableImage,
    centre_crop,
    image_extensions,
    load_image,
)

# Below this many files, loading is quick enough that a progress bar is only noise.
PROGRESS_MIN_FILES = 300


def printable(text: str) -> str:
    """`text` with its non-printable characters (newline, escape, bidi controls...) escaped as
    in `repr`, so that a hostile file name cannot forge or hide lines of output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def find_classes(root: str | Path) -> list[str]:
    """The class names of an image folder: its subfolders (not hidden), sorted."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root}: no class subfolders (expected one subfolder per class)")
    return classes


def load_image_folder(
    root: str | Path,
    channels: int = 3,
    image_size: int = 224,
    *,
    classes: Sequence[str] | None = None,
    subset: Literal["all", "train", "val"] = "all",
    val_fraction: float = 0.1,
    seed: int = 0,
    name: str | None = None,
    crop_pct: float = 1.0,
) -> ImageDataset:
    """Every image under `root`/<class>/ (searched recursively), decoded by the module's rules.

    `classes` fixes the class names and their order (a validation folder must use those of
    its training folder); by default they are the sorted subfolder names. `subset` "train" or
    "val" keeps one part of a stratified split that holds out `val_fraction` of each class,
    reproducibly by `seed`; only that part is decoded, each image's centre crop of `crop_pct`
    (see `centre_crop`). Unreadable files are skipped, listed in
    the dataset's `skipped` and summarised on stderr; no readable image at all is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    if classes is None:
        classes = find_classes(root)
    else:
        extra = set(find_classes(root)) - set(classes)
        if extra:
            raise DatasetError(f"{root}: class folder(s) {sorted(extra)} not among {classes}")
    files, labels, ignored = list_images(root, classes)
    if subset != "all":
        keep = split_indices(labels, subset, val_fraction, seed)
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        if not files:
            raise DatasetError(
                f"{root}: the {subset} part is empty (val_fraction {val_fraction}); "
                "use a larger fraction or more images"
            )
    crop = centre_crop(crop_pct)
    images, kept, skipped = _decode_all(files, channels, image_size, crop, f"loading {root.name}")
    if not kept:
        first = f"; first: {printable(skipped[0][0])}: {skipped[0][1]}" if skipped else ""
        raise DatasetError(
            f"{root}: no readable images ({len(skipped)} unreadable, {ignored} file(s) of "
            f"other types){first}"
        )
    if skipped:
        print(
            printable(
                f"warning: {root}: skipped {len(skipped)} unreadable image file(s), "
                f"e.g. {skipped[0][0]}: {skipped[0][1]}"
            ),
            file=sys.stderr,
        )
    return ImageDataset(
        images=images,
        labels=torch.tensor([labels[i] for i in kept], dtype=torch.int64),
        classes=list(classes),
        name=name or root.name,
        skipped=skipped,
    )


def _decode_all(
    files: list[Path], channels: int, image_size: int, crop: Crop, desc: str
) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """The readable files decoded into one uint8 tensor: (images, indices of the files they
    are, (path, reason) of each unreadable one)."""
    images = torch.empty((len(files), channels, image_size, image_size), dtype=torch.uint8)
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    quiet = len(files) < PROGRESS_MIN_FILES
    for i, path in enumerate(tqdm(files, desc=desc, unit="img", disable=quiet)):
        try:
            images[len(kept)] = load_image(path, channels, image_size, crop=crop)
        except UnreadableImage as e:
            skipped.append((e.path, e.reason))
            continue
        kept.append(i)
    if len(kept) < len(files):
        images = images[: len(kept)].clone()
    return images, kept, skipped


def list_images(root: Path, classes: Sequence[str]) -> tuple[list[Path], list[int], int]:
    """The image files (by their names) under `root`/<class>/, hidden ones left out, sorted by
    class and path: (files, labels, how many files were ignored as not images)."""
    extensions = image_extensions()
    files, labels, ignored = [], [], 0
    for label, cls in enumerate(classes):
        class_dir = root / cls
        if not class_dir.is_dir():
            continue  # a class with no images here (e.g. in a small validation folder)
        for path in sorted(class_dir.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(class_dir).parts):
                continue
            if not path.is_file():
                continue
            if path.suffix.lower() in extensions:
                files.append(path)
                labels.append(label)
            else:
                ignored += 1
    return files, labels, ignored


def split_image_folder(
    root: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    channels: int = 3,
    image_size: int = 224,
) -> tuple[ImageDataset, ImageDataset]:
    """(train, val) of one image folder, holding out `val_fraction` of each class."""
    kwargs = {"val_fraction": val_fraction, "seed": seed}
    train = load_image_folder(root, channels, image_size, subset="train", **kwargs)
    val = load_image_folder(root, channels, image_size, subset="val", **kwargs)
    return train, val
