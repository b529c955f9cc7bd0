"""Batch transforms: whole uint8 or float batches at once, randomness from a torch.Generator.

Training, in order: uint8 -> float in [0, 1] -> random resized crop (or resize) -> padded
random crop -> horizontal flip -> RandAugment -> normalise -> random erasing -> mixup/cutmix.
Each random choice is drawn per sample, but applied as tensor maths over the whole batch, so
a step costs a few kernels whatever the batch size. The same generator seed gives the same
batch. Random numbers are drawn on the generator's device and moved to the batch's, so a CPU
generator works with a GPU batch (a generator on the batch's device saves the copies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vitkit.data.preprocess import normalize, resize, to_float


@dataclass(frozen=True)
class AugmentConfig:
    """Which training augmentations run, and how strongly; the defaults switch all off."""

    crop_padding: int = 0  # pad with zeros by this much, then crop back at a random offset
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.35, 1.0)  # area fraction; small images need > 0.08
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False  # off by default: it changes the meaning of digits and letters
    randaugment_ops: int = 0  # ops per image; 2 is the paper's usual choice
    randaugment_magnitude: float = 9.0  # 0..10, 10 being each op's strongest setting
    random_erasing: float = 0.0  # probability of erasing one rectangle per image
    mixup: float = 0.0  # Beta(alpha, alpha) concentration; 0 switches mixup off
    cutmix: float = 0.0  # likewise for cutmix; with both on, each image gets one of them
    mix_prob: float = 1.0  # probability that an image is mixed at all

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if self.crop_padding < 0 or self.randaugment_ops < 0:
            raise ValueError("crop_padding and randaugment_ops must be >= 0")
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if not 0 <= self.randaugment_magnitude <= 10:
            raise ValueError("randaugment_magnitude must be in [0, 10]")
        for name in ("random_erasing", "mix_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1]")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("mixup and cutmix must be >= 0")

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0


# -- random draws -----------------------------------------------------------------------
def _rand(gen: torch.Generator, n: int, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device).to(device)


def _uniform(
    gen: torch.Generator, n: int, lo: float, hi: float, device: torch.device
) -> torch.Tensor:
    return _rand(gen, n, device) * (hi - lo) + lo


def _sign(gen: torch.Generator, n: int, device: torch.device) -> torch.Tensor:
    return torch.where(_rand(gen, n, device) < 0.5, -1.0, 1.0)


# -- geometry -----------------------------------------------------------------------------
def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Pad with zeros, then cut each image back to its size at its own random offset."""
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(2 * padding + 1, (b,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(2 * padding + 1, (b,), generator=gen, device=gen.device).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    # One gather over the flattened padded images: index (row, col) -> row * width + col.
    index = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]
    index = index.view(b, 1, h * w).expand(b, c, h * w)
    return padded.flatten(2).gather(2, index).view(b, c, h, w)


def random_hflip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability `p`."""
    flip = _rand(gen, x.shape[0], x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_resized_crop(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    size: int | None = None,
) -> torch.Tensor:
    """Crop a random area fraction in `scale` with aspect ratio in `ratio` from each image and
    resize it (bilinear) to size x size: one affine sampling grid per image."""
    b, c = x.shape[:2]
    size = size or x.shape[-1]
    area = _uniform(gen, b, *scale, x.device)
    aspect = torch.exp(_uniform(gen, b, math.log(ratio[0]), math.log(ratio[1]), x.device))
    # Width and height as fractions of the image's, clipped to the image.
    cw = torch.sqrt(area * aspect).clamp(max=1)
    ch = torch.sqrt(area / aspect).clamp(max=1)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = cw, ch
    # Centres in normalised coordinates ([-1, 1] spans the image), so the crop stays inside.
    theta[:, 0, 2] = _uniform(gen, b, -1, 1, x.device) * (1 - cw)
    theta[:, 1, 2] = _uniform(gen, b, -1, 1, x.device) * (1 - ch)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Resample each image through its (b, 2, 3) output->input map; outside fills with 0."""
    grid = F.affine_grid(matrix.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _eye(v: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(len(v), 2, 3, device=v.device)
    m[:, 0, 0] = m[:, 1, 1] = 1
    return m


# -- RandAugment ----------------------------------------------------------------------------
# Each op takes images in [0, 1] and a signed strength v in [-1, 1] per image (magnitude / 10
# with a random sign; ops without a direction use |v|). Ranges follow the usual RandAugment
# ones: enhance factors 1 +- 0.9, rotation +-30 degrees, shear +-0.3, translation +-45%.
def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
    return (x * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _blend(base: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageEnhance: base + factor * (x - base), factor = 1 + 0.9 v."""
    factor = (1 + 0.9 * v).view(-1, 1, 1, 1)
    return (base + factor * (x - base)).clamp_(0, 1)


def _identity(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x


def _brightness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, v)


def _contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(_grey(x).mean((1, 2, 3), keepdim=True), x, v)


def _color(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(_grey(x), x, v)  # saturation; grey images stay as they are


def _sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
    return _blend(smooth, x, v)


def _posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Keep 8 - round(4|v|) bits: a quantisation step of 2**dropped_bits grey levels.
    step = (2 ** torch.round(4 * v.abs())).view(-1, 1, 1, 1)
    return torch.floor(torch.round(x * 255) / step) * step / 255


def _solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    threshold = (1 - v.abs()).view(-1, 1, 1, 1)
    return torch.where(x > threshold, 1 - x, x)


def _autocontrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    flat = hi <= lo  # a constant channel stays as it is
    return torch.where(flat, x, (x - lo) / torch.where(flat, 1, hi - lo))


def _rotate(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    angle = torch.deg2rad(30 * v)
    m = torch.zeros(len(v), 2, 3, device=x.device)
    m[:, 0, 0] = m[:, 1, 1] = torch.cos(angle)
    m[:, 0, 1], m[:, 1, 0] = -torch.sin(angle), torch.sin(angle)
    return _affine(x, m)


def _shear_x(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    m = _eye(v)
    m[:, 0, 1] = 0.3 * v
    return _affine(x, m)


def _shear_y(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    m = _eye(v)
    m[:, 1, 0] = 0.3 * v
    return _affine(x, m)


def _translate_x(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    m = _eye(v)
    m[:, 0, 2] = 2 * 0.45 * v  # normalised coordinates: the image is 2 wide
    return _affine(x, m)


def _translate_y(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    m = _eye(v)
    m[:, 1, 2] = 2 * 0.45 * v
    return _affine(x, m)


# Equalize (histogram equalisation) is left out: it has no cheap batched form.
RANDAUGMENT_OPS = (
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


def rand_augment(
    x: torch.Tensor, num_ops: int, magnitude: float, gen: torch.Generator
) -> torch.Tensor:
    """Apply `num_ops` ops, each picked uniformly per image, at `magnitude` (0..10), to a
    float batch in [0, 1]. Loops over op types, never over images."""
    b = x.shape[0]
    x = x.clone()
    for _ in range(num_ops):
        choice = torch.randint(len(RANDAUGMENT_OPS), (b,), generator=gen, device=gen.device)
        choice = choice.to(x.device)
        strength = _sign(gen, b, x.device) * (magnitude / 10)
        for k, op in enumerate(RANDAUGMENT_OPS):
            if op is _identity:
                continue
            idx = (choice == k).nonzero().flatten()
            if len(idx):
                x[idx] = op(x[idx], strength[idx])
    return x


# -- erasing and mixing -------------------------------------------------------------------------
def _boxes(
    size: tuple[int, int, int],
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
) -> torch.Tensor:
    """(b, 1, h, w) masks of per-image rectangles [top, top + height) x [left, left + width)."""
    b, h, w = size
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :]).view(b, 1, h, w)


def random_erasing(
    x: torch.Tensor,
    p: float,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """With probability `p` per image, replace one random rectangle (area fraction in `scale`,
    aspect in `ratio`) by standard normal noise; meant for normalised batches."""
    b, _, h, w = x.shape
    area = _uniform(gen, b, *scale, x.device) * h * w
    aspect = torch.exp(_uniform(gen, b, math.log(ratio[0]), math.log(ratio[1]), x.device))
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = torch.floor(_rand(gen, b, x.device) * (h - eh + 1))
    left = torch.floor(_rand(gen, b, x.device) * (w - ew + 1))
    mask = _boxes((b, h, w), top, left, eh, ew)
    mask &= (_rand(gen, b, x.device) < p).view(b, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
    return torch.where(mask, noise, x)


def mix(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    gen: torch.Generator,
    mixup: float = 0.8,
    cutmix: float = 1.0,
    prob: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup / cutmix: (mixed batch, soft targets (B, num_classes) whose rows sum to 1).

    Image i is mixed with image B-1-i (the batch reversed), with its own lambda from
    Beta(alpha, alpha); with both methods on, each image gets one of them at random, and with
    probability 1 - `prob` it is left alone. Cutmix's lambda is the area actually kept once
    the box is clipped to the image. `labels` are class indices (B,) or soft targets (B, K).
    """
    b, _, h, w = x.shape
    targets = labels.to(x.dtype) if labels.ndim == 2 else F.one_hot(labels, num_classes).to(x.dtype)
    if mixup <= 0 and cutmix <= 0:
        return x, targets
    if mixup > 0 and cutmix > 0:
        use_cut = _rand(gen, b, x.device) < 0.5
    else:
        use_cut = torch.full((b,), cutmix > 0, device=x.device)
    # Beta sampling takes no torch generator: a NumPy one, seeded from `gen`, stays reproducible.
    seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device))
    alpha = np.where(use_cut.cpu().numpy(), cutmix, mixup)
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha)).to(x.device, x.dtype)
    lam = torch.where(_rand(gen, b, x.device) < prob, lam, 1.0)

    # Cutmix boxes: side fraction sqrt(1 - lambda), centred anywhere, clipped to the image.
    side = torch.sqrt(1 - lam)
    cy = torch.floor(_rand(gen, b, x.device) * h)
    cx = torch.floor(_rand(gen, b, x.device) * w)
    half_h, half_w = torch.floor(side * h / 2), torch.floor(side * w / 2)
    top, bottom = (cy - half_h).clamp(0, h), (cy + half_h).clamp(0, h)
    left, right = (cx - half_w).clamp(0, w), (cx + half_w).clamp(0, w)
    box = _boxes((b, h, w), top, left, bottom - top, right - left)
    lam_cut = 1 - (bottom - top) * (right - left) / (h * w)

    other = x.flip(0)
    cut = use_cut.view(b, 1, 1, 1)
    lam_img = lam.view(b, 1, 1, 1)
    mixed = torch.where(cut, torch.where(box, other, x), lam_img * x + (1 - lam_img) * other)
    lam = torch.where(use_cut, lam_cut, lam).view(b, 1)
    return mixed, lam * targets + (1 - lam) * targets.flip(0)


# -- pipelines ----------------------------------------------------------------------------------
class TrainTransform:
    """uint8 batch + labels -> (normalised float batch, targets), augmented by `aug`.

    Targets are the int64 labels, or (B, num_classes) soft targets when mixup/cutmix is on.
    `image_size`, if given, is the model's input size (the random resized crop produces it
    directly; otherwise the batch is resized).
    """

    def __init__(
        self,
        aug: AugmentConfig,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int | None = None,
        image_size: int | None = None,
    ) -> None:
        if aug.mixes and num_classes is None:
            raise ValueError("mixup/cutmix make soft targets: pass num_classes")
        self.aug, self.mean, self.std = aug, tuple(mean), tuple(std)
        self.num_classes, self.image_size = num_classes, image_size

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        aug = self.aug
        x = to_float(images)
        size = self.image_size or x.shape[-1]
        if aug.random_resized_crop:
            x = random_resized_crop(x, gen, aug.crop_scale, aug.crop_ratio, size)
        else:
            x = resize(x, size)
        x = random_crop(x, aug.crop_padding, gen)
        if aug.hflip:
            x = random_hflip(x, gen)
        if aug.randaugment_ops:
            x = rand_augment(x, aug.randaugment_ops, aug.randaugment_magnitude, gen)
        x = normalize(x, self.mean, self.std, inplace=x is not images)  # x: made here
        if aug.random_erasing:
            x = random_erasing(x, aug.random_erasing, gen)
        if aug.mixes and self.num_classes is not None:
            return mix(x, labels, self.num_classes, gen, aug.mixup, aug.cutmix, aug.mix_prob)
        return x, labels
