"""Preprocessing: an image file (or PIL image, or tensor) -> the normalised tensor a model
takes. One module, used by training's evaluation, prediction, export and the service alike.

A file is decoded by these rules (`load_image`):

1. Only regular files whose bytes are in one of `IMAGE_FORMATS` are read, whatever their names
   say: Pillow picks a decoder by the bytes, and would hand PostScript to Ghostscript.
2. EXIF orientation is applied, so images look as they do in a viewer.
3. Modes become 8-bit grey or RGB: 16-bit grey (I;16, and I taken as 16-bit) is scaled by
   1/257, float (F) is taken as 0..1, palettes are expanded, CMYK and other colour spaces are
   converted by Pillow. Transparency is composited on black, so a transparent pixel reads as
   0, the empty background of MNIST-style data.
4. Grey becomes RGB by repetition and RGB becomes grey by luma (ITU-R 601), to `channels`.
5. The shorter side is resized to `image_size` (bicubic unless told otherwise) and the centre
   square is kept.

A batch of such images becomes a model's input by `preprocess`: float in [0, 1], channels
matched, centre-cropped, resized with the model's filter, then `(x - mean) / std`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from vitkit.config import ViTConfig
from vitkit.data.dataset import DatasetError

# The formats read anywhere (files, folders, uploads), as `Image.open(formats=...)` takes them:
# raster only, never EPS or PS. JPEG covers MPO, which Pillow's JPEG opener returns for
# multi-picture files (naming MPO here would make Image.open fail on every other format).
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")

# ITU-R 601-2 luma, the weights Pillow uses for RGB -> "L".
_LUMA = (0.299, 0.587, 0.114)


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


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1]; float input is returned as it is."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {images.dtype}")
    return images


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel of a (..., C, H, W) batch."""
    if len(mean) != x.shape[-3] or len(std) != x.shape[-3]:
        raise ValueError(f"mean and std need one value per channel ({x.shape[-3]})")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def resize(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """A float batch in [0, 1] resized to size x size (antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    x = F.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False)
    return x.clamp_(0, 1)  # bicubic overshoots at edges


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Float images (B, C, H, W) with `channels` channels: grey is repeated, colour to luma."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:
        if have == 3:
            weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            return (x * weights).sum(dim=1, keepdim=True)
        return x.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def preprocess(images: torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """Images (B, C, H, W), uint8 or float in [0, 1], as the normalised inputs `config` expects.

    Channels are matched, non-square images centre-cropped, and the size changed with the
    model's interpolation (antialiased); then `(x - mean) / std` per channel.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"expected uint8 or float images, got {images.dtype}")
    x = match_channels(to_float(images), config.in_channels)
    h, w = x.shape[-2:]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[..., top : top + side, left : left + side]
    x = resize(x, config.image_size, config.interpolation)
    return normalize(x, config.mean, config.std)
