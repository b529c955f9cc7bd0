"""Image -> patches -> tokens: one convolution whose kernel and stride are the patch size.

The hybrid model first turns the image into a CNN feature map and cuts that into patches.
"""

from __future__ import annotations

import torch
from torch import nn

from vitkit.config import ViTConfig
from vitkit.model.resnet import ResNetV2


class PatchEmbed(nn.Module):
    """Cut (B, C, H, W) into non-overlapping p x p patches and project each to a D-dim token.

    A Conv2d with kernel = stride = p is exactly "flatten each patch, multiply by E" of the paper.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        c = config
        self.in_channels, self.token_stride = c.in_channels, c.token_stride
        self.backbone = (
            ResNetV2(c.in_channels, c.resnet_layers, c.resnet_width, c.resnet_stem)
            if c.resnet_layers is not None
            else None
        )
        p = c.patch_size
        # CLIP's projection has no bias (the position embeddings, added to every patch, can
        # learn one); it comes with CLIP's norm_pre, here as in timm.
        self.proj = nn.Conv2d(c.cnn_channels, c.width, kernel_size=p, stride=p, bias=not c.norm_pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/s * W/s, D), tokens in row-major order (s: token stride)."""
        check_image_batch(x, self.in_channels, self.token_stride)
        if self.backbone is not None:
            x = self.backbone(x)
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
