"""Flip and RandAugment of one decoded image, in a streaming worker process.

A streamed batch is decoded image by image in worker processes (stream.py); doing the
per-image augmentations there too, on the 8-bit image Pillow has just resized, leaves the
main process only the normalisation and the batch-level mixing, and costs a fraction of the
batched float ops on a CPU. The ops, their ranges and their order are those of
`transforms.RANDAUGMENT_OPS` (tested op by op against them): enhance factors 1 +- 0.9 v,
rotation +-30 v degrees, shear +-0.3 v, translation +-45% v, zeros outside the image.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

# An op: the image and its signed strength v in [-1, 1] (magnitude / 10, random sign).
Op = Callable[[Image.Image, float], Image.Image]
_BILINEAR = Image.Resampling.BILINEAR


def _affine(
    img: Image.Image, a: float, b: float, d: float, e: float, tx: float, ty: float
) -> Image.Image:
    """Resample through the output->input map (x, y) -> (a x + b y + tx, d x + e y + ty),
    about the image's centre, in pixels; zeros outside."""
    cx, cy = img.width / 2, img.height / 2
    c = cx + tx - a * cx - b * cy
    f = cy + ty - d * cx - e * cy
    return img.transform(img.size, Image.Transform.AFFINE, (a, b, c, d, e, f), _BILINEAR)


def _identity(img: Image.Image, v: float) -> Image.Image:
    return img


def _autocontrast(img: Image.Image, v: float) -> Image.Image:
    return ImageOps.autocontrast(img)


def _brightness(img: Image.Image, v: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1 + 0.9 * v)


def _contrast(img: Image.Image, v: float) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(1 + 0.9 * v)


def _color(img: Image.Image, v: float) -> Image.Image:
    return ImageEnhance.Color(img).enhance(1 + 0.9 * v)


def _sharpness(img: Image.Image, v: float) -> Image.Image:
    # Pillow's Sharpness leaves the border as it is; the batched op blends it with a
    # border-replicated blur, a difference of one pixel's width.
    smooth = img.filter(ImageFilter.SMOOTH)
    return Image.blend(smooth, img, 1 + 0.9 * v)


def _posterize(img: Image.Image, v: float) -> Image.Image:
    return ImageOps.posterize(img, 8 - round(4 * abs(v)))


def _solarize(img: Image.Image, v: float) -> Image.Image:
    threshold = 255 * (1 - abs(v))  # inverted strictly above it, as the batched op does
    table = [255 - p if p > threshold else p for p in range(256)]
    return img.point(table * len(img.getbands()))


def _rotate(img: Image.Image, v: float) -> Image.Image:
    # The batched op's matrix in normalised coordinates, which are square for a square image.
    t = math.radians(30 * v)
    return _affine(img, math.cos(t), -math.sin(t), math.sin(t), math.cos(t), 0, 0)


def _shear_x(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, 1, 0.3 * v, 0, 1, 0, 0)


def _shear_y(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, 1, 0, 0.3 * v, 1, 0, 0)


def _translate_x(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, 1, 0, 0, 1, 0.45 * v * img.width, 0)


def _translate_y(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, 1, 0, 0, 1, 0, 0.45 * v * img.height)


# In the order of `transforms.RANDAUGMENT_OPS`.
OPS: tuple[Op, ...] = (
    _identity,
    _autocontrast,
    _brightness,
    _contrast,
    _color,
    _sharpness,
    _posterize,
    _solarize,
    _rotate,
    _shear_x,
    _shear_y,
    _translate_x,
    _translate_y,
)


@dataclass(frozen=True)
class SampleAugment:
    """A horizontal flip (with probability 1/2) and `randaugment_ops` RandAugment ops at
    `randaugment_magnitude` (0..10), each picked uniformly, drawn from the image's own `rng`."""

    hflip: bool = False
    randaugment_ops: int = 0
    randaugment_magnitude: float = 9.0

    def __bool__(self) -> bool:
        return self.hflip or self.randaugment_ops > 0

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for _ in range(self.randaugment_ops):
            op = OPS[rng.randrange(len(OPS))]
            v = (1 if rng.random() < 0.5 else -1) * self.randaugment_magnitude / 10
            img = op(img, v)
        return img
