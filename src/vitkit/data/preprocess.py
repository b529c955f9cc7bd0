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
   square is kept; a model's evaluation and prediction keep only the central `crop_pct` of it
   (`centre_crop`, timm's convention), resized to `image_size` in the same step. An image
   more than four times `image_size` on its shorter side is first reduced by a whole factor
   (block averages, as Pillow's `reducing_gap` does) to no less than twice `image_size`, a
   strip at a time before step 3, so that a 16-bit, float, palette or transparent image never
   has a full-size float or RGBA copy made of it.

Only the first frame of an animated or multi-page file (GIF, TIFF, APNG, WebP, MPO) is read;
the others are never decoded. An image larger than a pixel limit, by its declared size or by a
TIFF tile that libtiff would decode whole, is refused before anything is decoded (`check_pixels`).

A batch of such images becomes a model's input by `preprocess`: float in [0, 1], channels
matched, centre-cropped, resized with the model's filter, then `(x - mean) / std`.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, UnidentifiedImageError

from vitkit.config import ViTConfig
from vitkit.data.dataset import DatasetError

try:
    from vitkit.data._jpeg import decode_region
except ImportError:  # built without libjpeg's headers: Pillow decodes every JPEG whole
    decode_region = None

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


class ImageTooLarge(ValueError):
    """An image over a pixel limit, by its declared size or by a part its decoder fills whole."""


# Reduction leaves at least this many times image_size on the shorter side, so the resize that
# follows changes the size by at least 2x: Pillow's `reducing_gap` default for thumbnails,
# "indistinguishable from fair resampling in most cases".
_REDUCING_GAP = 2
# Pixels converted at a time when reducing: bounds the float and RGBA copies made by `_to_8bit`.
_STRIP_PIXELS = 1 << 20
# TIFF tags: libtiff decodes a tiled image a tile at a time, each into a buffer of the declared
# tile size, however small the image (a 16 x 16 image with 32768 x 32768 tiles takes 1 GiB).
_TILE_WIDTH, _TILE_LENGTH = 322, 323
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Orientations that turn the image by 90 degrees: its width is the file's height.
_TURNS = (5, 6, 7, 8)
# A JPEG is read whole into memory for the region decoder up to this size; a larger one (a
# few hundred megapixels) is left to Pillow, which streams it.
_MAX_JPEG_BYTES = 64 << 20
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


# (width, height) of an image, as a viewer shows it -> the box to cut from it, in fractions of
# the width and height: (left, top, right, bottom).
Crop = Callable[[int, int], tuple[float, float, float, float]]


def centre_square(width: int, height: int) -> tuple[float, float, float, float]:
    """The centre square's box (the default `Crop`: shorter side to size, centre crop)."""
    side = min(width, height)
    return (
        (width - side) / 2 / width,
        (height - side) / 2 / height,
        (width + side) / 2 / width,
        (height + side) / 2 / height,
    )


def centre_crop(crop_pct: float) -> Crop:
    """The centre square scaled about its centre by `crop_pct` (timm's eval crop: the shorter
    side resized to image_size / crop_pct, image_size cut from the centre); `centre_square`
    itself for 1.0."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if crop_pct == 1:
        return centre_square

    def box(width: int, height: int) -> tuple[float, float, float, float]:
        side = min(width, height) * crop_pct
        return (
            (width - side) / 2 / width,
            (height - side) / 2 / height,
            (width + side) / 2 / width,
            (height + side) / 2 / height,
        )

    return box


def load_image(
    source: str | Path | BinaryIO | Image.Image,
    channels: int = 3,
    image_size: int = 224,
    interpolation: str = "bicubic",
    *,
    max_pixels: int | None = None,
    crop: Crop = centre_square,
    augment: Callable[[Image.Image], Image.Image] | None = None,
    region_decode: bool = False,
) -> torch.Tensor:
    """One image as uint8 (channels, image_size, image_size), decoded by the module's rules.

    `crop` picks the part of the image resized to image_size x image_size (default: the centre
    square); a JPEG is decoded at the smallest reduced scale that still covers it, so a random
    crop of a large photo samples the photo at full detail where it needs it. A file object
    is read as a file's bytes would be (e.g. a member of a tar shard). An image over
    `max_pixels` (see `check_pixels`) is refused before it is decoded: with `ImageTooLarge` for
    a PIL image, `UnreadableImage` for a file. By default a file's limit is Pillow's own (twice
    `Image.MAX_IMAGE_PIXELS`), a PIL image's none. `augment`, if given, changes the decoded
    image at image_size before it becomes a tensor (training's per-image augmentations).

    With `region_decode` a JPEG's crop is decoded alone where it can be (`_jpeg_region`): the
    same pixels, resized to within a few levels of Pillow's whole-image result (Pillow orders
    its two resampling passes by the input's size). Training's random crops use it;
    evaluation and prediction, which must not depend on what was compiled, do not.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {', '.join(_RESAMPLE)}")
    resample = _RESAMPLE[interpolation]
    if isinstance(source, Image.Image):
        if max_pixels is not None:
            check_pixels(source, max_pixels)
        decoded = _decode(source, channels, image_size, resample, crop)
        return _to_tensor(augment(decoded) if augment else decoded)
    path = Path(getattr(source, "name", "<bytes>")) if hasattr(source, "read") else Path(source)
    if max_pixels is None and Image.MAX_IMAGE_PIXELS:
        max_pixels = 2 * int(Image.MAX_IMAGE_PIXELS)  # where Image.open raises its bomb error
    try:
        opened = contextlib.nullcontext(source) if hasattr(source, "read") else open_regular(path)
        with opened as f, Image.open(f, formats=IMAGE_FORMATS) as img:
            if max_pixels is not None:
                check_pixels(img, max_pixels)
            # JPEGs can decode straight at a reduced scale that still covers the crop at
            # image_size: the box's share of each side, in the file's own orientation.
            turned = _orientation(img) in _TURNS
            w, h = img.size[::-1] if turned else img.size
            x0, y0, x1, y1 = crop(w, h)
            need = (image_size / max(x1 - x0, 1e-6), image_size / max(y1 - y0, 1e-6))
            need = need[::-1] if turned else need
            fw, fh = img.size
            draft = (min(math.ceil(need[0]), fw), min(math.ceil(need[1]), fh))
            decoded = None
            if region_decode:
                decoded = _jpeg_region(f, img, draft, channels, image_size, resample, crop)
            if decoded is None:
                img.draft(None, draft)
                decoded = _decode(img, channels, image_size, resample, crop)
    except UnidentifiedImageError:
        formats = ", ".join(IMAGE_FORMATS)
        raise UnreadableImage(path, f"not an image in a format read here ({formats})") from None
    # Pillow's decoders raise many exception types on broken input; all mean "unreadable".
    except Exception as e:
        raise UnreadableImage(path, str(e) or type(e).__name__) from None
    return _to_tensor(augment(decoded) if augment else decoded)


def check_pixels(img: Image.Image, max_pixels: int) -> None:
    """Raises `ImageTooLarge` if an opened image declares more than `max_pixels` pixels, or has
    a part its decoder fills whole (a tile) that does. Nothing is decoded.

    The declared size is that of the frame decoded (the first): a GIF's, as Pillow reports it,
    grows to cover a first frame larger than its logical screen.
    """
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(
            f"the image is {w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,}"
        )
    # A frame larger than the image, where Pillow does not grow the image to cover it.
    for tile in getattr(img, "tile", None) or ():
        extents = tile[1]  # a tuple before Pillow 11, a named tuple since
        if extents is None:
            continue
        x0, y0, x1, y1 = extents
        if (x1 - x0) * (y1 - y0) > max_pixels:
            raise ImageTooLarge(
                f"a tile of the image is {x1 - x0} x {y1 - y0} pixels, over the limit of "
                f"{max_pixels:,}"
            )
    tags = getattr(img, "tag_v2", None)  # a TIFF's tags
    if tags is not None:
        tw, tl = (_first_int(tags.get(tag)) for tag in (_TILE_WIDTH, _TILE_LENGTH))
        if tw * tl > max_pixels:
            raise ImageTooLarge(
                f"the image declares tiles of {tw} x {tl} = {tw * tl:,} pixels, decoded whole, "
                f"over the limit of {max_pixels:,}"
            )


def _first_int(value: object) -> int:
    """A TIFF tag's value as an int (0 if absent or not a number)."""
    if isinstance(value, tuple):
        value = value[0] if value else 0
    return value if isinstance(value, int) and value > 0 else 0


def open_regular(path: Path) -> BinaryIO:
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


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except (TypeError, ValueError):
        return 1


def _decode(
    img: Image.Image,
    channels: int,
    image_size: int,
    resample: Image.Resampling,
    crop: Crop = centre_square,
) -> Image.Image:
    img.load()  # a PNG's eXIf chunk may follow its pixels
    method = _ORIENTATION.get(_orientation(img))
    if method is not None:
        # Oriented before reducing, so reduction's blocks line up with the output's edges.
        # A copy, but oriented images are nearly always JPEGs, already decoded at a reduced scale.
        img = img.transpose(method)
    w, h = img.size
    box = _box(crop, w, h)
    side = min(box[2] - box[0], box[3] - box[1])
    factor = max(1, int(side // (_REDUCING_GAP * image_size)))
    mode = "L" if channels == 1 else "RGB"
    if factor == 1 and w * h <= (2 * _REDUCING_GAP * image_size) ** 2:
        # No larger than a square that would be reduced: converted at once, as it always was.
        img = _to_8bit(img).convert(mode)
        if (w, h) == (image_size, image_size) and box == (0, 0, w, h):  # nothing to crop
            return img
        return img.resize((image_size, image_size), resample, box=box)
    # Only the square and what the filter reaches around it (bicubic: 2 output pixels, and a
    # block more for rounding) are converted, in whole blocks of the reduction: a panorama's
    # far ends never are.
    reach = 2 * max(box[2] - box[0], box[3] - box[1]) / image_size + factor
    x0 = max(0, math.floor((box[0] - reach) / factor) * factor)
    y0 = max(0, math.floor((box[1] - reach) / factor) * factor)
    x1 = min(w, math.ceil((box[2] + reach) / factor) * factor)
    y1 = min(h, math.ceil((box[3] + reach) / factor) * factor)
    img = _reduced(img, mode, factor, (x0, y0, x1, y1))
    # Pixel i of the reduced image covers source pixels x0 + i * factor to x0 + (i + 1) * factor.
    box = (
        (box[0] - x0) / factor,
        (box[1] - y0) / factor,
        (box[2] - x0) / factor,
        (box[3] - y0) / factor,
    )
    return img.resize((image_size, image_size), resample, box=box)


def _box(crop: Crop, w: int, h: int) -> tuple[float, float, float, float]:
    """`crop`'s box in pixels of a w x h image. Cropping the box in source coordinates and
    resizing it in one step is the same as, for the centre square, "shorter side to
    image_size, then centre crop", without rounding the size in between."""
    if crop is centre_square:  # in pixels, exactly as before crops could be chosen
        side = min(w, h)
        return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    fx0, fy0, fx1, fy1 = crop(w, h)
    return (fx0 * w, fy0 * h, fx1 * w, fy1 * h)


def _jpeg_region(
    f: BinaryIO,
    img: Image.Image,
    draft: tuple[int, int],
    channels: int,
    image_size: int,
    resample: Image.Resampling,
    crop: Crop,
) -> Image.Image | None:
    """What `_decode` makes of the JPEG `img` drafted to `draft` (within a few levels, see
    `load_image`), with only the crop's part of the file decoded (`vitkit.data._jpeg`: libjpeg
    skips the rows above it, leaves the columns beside it untransformed and stops after it);
    None where that does not apply: no decoder built, not a plain grey or colour JPEG, turned
    by its EXIF orientation, reduced further than the draft, or anything libjpeg warns about
    (Pillow then decodes the file and decides)."""
    if decode_region is None or img.format != "JPEG" or img.mode not in ("L", "RGB"):
        return None
    if _orientation(img) != 1:
        return None
    w, h = img.size
    # The scale Pillow's `draft` picks: the smallest (1/8 .. 1) that keeps `draft` covered.
    most = min(w // draft[0], h // draft[1])
    denom = next(d for d in (8, 4, 2, 1) if d <= max(most, 1))
    w, h = -(-w // denom), -(-h // denom)
    box = _box(crop, w, h)
    side = min(box[2] - box[0], box[3] - box[1])
    if side // (_REDUCING_GAP * image_size) > 1:
        return None  # `_decode` block-averages first
    # What the resampling filter reaches around the box (bicubic: 2 input pixels a side,
    # times the reduction; 3 are taken), and more: libjpeg fills the outermost columns of a
    # region without their neighbours' colour, so they must lie outside that reach.
    reach = 3 * max(1.0, (box[2] - box[0]) / image_size, (box[3] - box[1]) / image_size) + 2
    x0, y0 = max(0, math.floor(box[0] - reach)), max(0, math.floor(box[1] - reach))
    x1, y1 = min(w, math.ceil(box[2] + reach)), min(h, math.ceil(box[3] + reach))
    try:
        f.seek(0)
        data = f.read(_MAX_JPEG_BYTES + 1)
        if len(data) > _MAX_JPEG_BYTES:
            return None
        pixels, width, height, bands, left = decode_region(data, denom, x0, y0, x1 - x0, y1 - y0)
    except (OSError, ValueError):
        return None
    region = Image.frombuffer("L" if bands == 1 else "RGB", (width, height), pixels)
    region = region.convert("L" if channels == 1 else "RGB")
    box = (box[0] - left, box[1] - y0, box[2] - left, box[3] - y0)
    return region.resize((image_size, image_size), resample, box=box)


def _reduced(
    img: Image.Image, mode: str, factor: int, region: tuple[int, int, int, int]
) -> Image.Image:
    """The `region` of `img` as 8-bit `mode` ("L" or "RGB"), `factor` times smaller by block
    averages (a partial block at the image's far edges averages the pixels there).

    Converted a strip of rows at a time, each a multiple of `factor` high: the same pixels as
    converting the whole region and then reducing it, without the full-size float or RGBA
    copies that converting it at once would make.
    """
    x0, y0, x1, y1 = region
    out = Image.new(mode, (-(-(x1 - x0) // factor), -(-(y1 - y0) // factor)))
    rows = max(1, _STRIP_PIXELS // ((x1 - x0) * factor)) * factor
    for top in range(y0, y1, rows):
        strip = img.crop((x0, top, x1, min(y1, top + rows)))  # keeps palette and transparency
        part = _to_8bit(strip).convert(mode)
        out.paste(part.reduce(factor) if factor > 1 else part, (0, (top - y0) // factor))
    return out


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


def normalize(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False
) -> torch.Tensor:
    """(x - mean) / std per channel of a (..., C, H, W) batch; `inplace` overwrites x (the same
    numbers, without two batch-sized allocations: half the time for a batch at 224 px)."""
    if len(mean) != x.shape[-3] or len(std) != x.shape[-3]:
        raise ValueError(f"mean and std need one value per channel ({x.shape[-3]})")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(m).div_(s) if inplace else (x - m) / s


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
