"""Image folders: one subfolder per class, decoded once into memory.

Only regular files whose bytes are in one of `IMAGE_FORMATS` are read, whatever their names say:
Pillow picks a decoder by the bytes, and would hand PostScript to Ghostscript. Every image goes
through the same rules, here and at prediction time (`load_image`):

1. EXIF orientation is applied, so images look as they do in a viewer.
2. Modes become 8-bit grey or RGB: 16-bit grey (I;16, and I taken as 16-bit) is scaled by
   1/257, float (F) is taken as 0..1, palettes are expanded, CMYK and other colour spaces are
   converted by Pillow. Transparency is composited on black, so a transparent pixel reads as
   0, the empty background of MNIST-style data.
3. Grey becomes RGB by repetition and RGB becomes grey by luma (ITU-R 601), to `channels`.
4. The shorter side is resized to `image_size` (bicubic unless told otherwise) and the centre
   square is kept.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from vitkit.data import DatasetError, ImageDataset, stratified_split

# Below this many files, loading is quick enough that a progress bar is only noise.
PROGRESS_MIN_FILES = 300
# The formats read anywhere (files, folders, uploads), as `Image.open(formats=...)` takes them:
# raster only, never EPS or PS. JPEG covers MPO, which Pillow's JPEG opener returns for
# multi-picture files (naming MPO here would make Image.open fail on every other format).
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


class UnreadableImage(DatasetError):
    """An image file that cannot be read: missing, not a regular file, corrupt, truncated, or
    not in one of `IMAGE_FORMATS`."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: cannot read image: {reason}")
        self.path, self.reason = str(path), reason


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # not on Windows, which has no FIFOs to open
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
)


def image_extensions() -> set[str]:
    """The file name extensions (lower case, with the dot) of the formats in `IMAGE_FORMATS`."""
    formats = {*IMAGE_FORMATS, "MPO"}
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in formats}


def printable(text: str) -> str:
    """`text` with its non-printable characters (newline, escape, bidi controls...) escaped as
    in `repr`, so that a hostile file name cannot forge or hide lines of output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def load_image(
    source: str | Path | Image.Image,
    channels: int = 3,
    image_size: int = 224,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """One image as uint8 (channels, image_size, image_size), decoded by the module's rules."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {', '.join(_RESAMPLE)}")
    resample = _RESAMPLE[interpolation]
    if isinstance(source, Image.Image):
        return _to_tensor(_decode(source, channels, image_size, resample))
    path = Path(source)
    try:
        with _open_regular(path) as f, Image.open(f, formats=IMAGE_FORMATS) as img:
            # JPEGs can decode straight at a reduced scale that still covers image_size.
            img.draft(None, (image_size, image_size))
            return _to_tensor(_decode(img, channels, image_size, resample))
    except UnidentifiedImageError:
        formats = ", ".join(IMAGE_FORMATS)
        raise UnreadableImage(path, f"not an image in a format read here ({formats})") from None
    # Pillow's decoders raise many exception types on broken input; all mean "unreadable".
    except Exception as e:
        raise UnreadableImage(path, str(e) or type(e).__name__) from None


def _open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, or OSError if it is not a regular file: opening a FIFO
    would wait for a writer, and a device could block or never end."""
    _check_regular(os.stat(path).st_mode)
    # Non-blocking, should the path become a FIFO between the check and the open.
    f = open(path, "rb", opener=lambda name, flags: os.open(name, flags | _NONBLOCK))  # noqa: SIM115
    try:
        _check_regular(os.fstat(f.fileno()).st_mode)
    except OSError:
        f.close()
        raise
    return f


def _check_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
        raise OSError(f"not a regular file ({kind})")


def _decode(
    img: Image.Image, channels: int, image_size: int, resample: Image.Resampling
) -> Image.Image:
    img = _to_8bit(ImageOps.exif_transpose(img))
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) == (image_size, image_size):
        return img
    # Cropping the centre square in source coordinates and resizing it in one step is the same
    # as "shorter side to image_size, then centre crop", without rounding the size in between.
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return img.resize((image_size, image_size), resample, box=box)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> "L" or "RGB" (before the conversion to the wanted channels)."""
    if img.mode.startswith("I"):  # Pillow's own I;16 -> L conversion clips instead of scaling
        values = np.asarray(img).astype(np.float32) / 257
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if img.mode == "F":
        values = np.asarray(img) * 255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, 0)
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    if img.mode in ("1", "L"):
        return img.convert("L")
    return img.convert("RGB")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    a = np.array(img)
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())


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
) -> ImageDataset:
    """Every image under `root`/<class>/ (searched recursively), decoded by the module's rules.

    `classes` fixes the class names and their order (a validation folder must use those of
    its training folder); by default they are the sorted subfolder names. `subset` "train" or
    "val" keeps one part of a stratified split that holds out `val_fraction` of each class,
    reproducibly by `seed`; only that part is decoded. Unreadable files are skipped, listed in
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
    files, labels, ignored = _list_images(root, classes)
    if subset != "all":
        train, val = stratified_split(torch.tensor(labels, dtype=torch.int64), val_fraction, seed)
        keep = (train if subset == "train" else val).tolist()
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        if not files:
            raise DatasetError(
                f"{root}: the {subset} part is empty (val_fraction {val_fraction}); "
                "use a larger fraction or more images"
            )
    images = torch.empty((len(files), channels, image_size, image_size), dtype=torch.uint8)
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    quiet = len(files) < PROGRESS_MIN_FILES
    for i, path in enumerate(tqdm(files, desc=f"loading {root.name}", unit="img", disable=quiet)):
        try:
            images[len(kept)] = load_image(path, channels, image_size)
        except UnreadableImage as e:
            skipped.append((e.path, e.reason))
            continue
        kept.append(i)
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
    if len(kept) < len(files):
        images = images[: len(kept)].clone()
    return ImageDataset(
        images=images,
        labels=torch.tensor([labels[i] for i in kept], dtype=torch.int64),
        classes=list(classes),
        name=name or root.name,
        skipped=skipped,
    )


def _list_images(root: Path, classes: Sequence[str]) -> tuple[list[Path], list[int], int]:
    """(files, labels, how many files were ignored as not images), in a stable order."""
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
