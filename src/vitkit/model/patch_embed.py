"""Image -> patches -> tokens: one convolution whose kernel and stride are the patch size."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Cut (B, C, H, W) into non-overlapping p x p patches and project each to a D-dim token.

    A Conv2d with kernel = stride = p is exactly "flatten each patch, multiply by E" of the paper.
    """

    def __init__(self, patch_size: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, D), patches in row-major order."""
        check_image_batch(x, self.in_channels, self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2)


def check_image_batch(x: torch.Tensor, channels: int, patch: int) -> None:
    """Reject inputs the convolution would silently crop or misread."""
    if x.ndim != 4:
        raise ValueError(f"expected an image batch of shape (B, C, H, W), got {tuple(x.shape)}")
    _, c, h, w = x.shape
    if c != channels:
        raise ValueError(f"the model takes {channels}-channel images, got {c} channels")
    if h < patch or w < patch:
        raise ValueError(f"image {h}x{w} is smaller than one {patch}x{patch} patch")
    if h % patch or w % patch:
        raise ValueError(
            f"image {h}x{w} is not a multiple of the patch size {patch}; resize or crop it"
        )
