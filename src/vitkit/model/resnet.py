"""The hybrid model's CNN: a ResNet-v2 (BiT) feature extractor whose map is cut into patches.

As in the paper's R50+ViT-B/16 (and BiT): weight-standardised convolutions with "same"
padding, GroupNorm (32 groups) instead of BatchNorm, bottleneck blocks, stride on the 3x3
convolution. Module names follow timm's `ResNetV2`, so timm's hybrid checkpoints map 1:1.

    image -> stem (7x7/2 conv + 3x3/2 max-pool, or 3x3/1 conv for small images)
          -> stages of bottleneck blocks (stride 1, then 2, 2, ...) -> feature map
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32
# timm's value: checkpoints converted from JAX (where it is 1e-5) still match to ~1e-4 relative.
WS_EPS = 1e-8


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one side (before, after): output = ceil(size / stride)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class StdConv2d(nn.Conv2d):
    """A bias-free convolution whose kernel is standardised (zero mean, unit variance per
    output channel) on every call, with "same" padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> None:
        # Stride 1 pads symmetrically, so it is static; stride 2 pads at run time.
        static = kernel // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel, stride, padding=static, bias=False)

        # The standardised kernel for calls without autograd, kept while the weight is
        # unchanged; `train()` and `eval()` drop it, as a fused optimiser step changes the
        # weight in place without bumping its version counter.
        self._frozen: tuple[tuple[int, int, torch.dtype], torch.Tensor] | None = None

    def train(self, mode: bool = True) -> StdConv2d:
        self._frozen = None
        return super().train(mode)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return (w - mean) * torch.rsqrt(var + WS_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            w = self.standardized_weight()
        else:  # inference: standardising costs a third of a small batch's time; do it once
            key = (self.weight._version, self.weight.data_ptr(), self.weight.dtype)
            if self._frozen is None or self._frozen[0] != key:
                with torch.inference_mode():
                    self._frozen = key, self.standardized_weight()
            w = self._frozen[1]
        if self.stride[0] > 1:
            x = _pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride, self.padding)


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom), value=value)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm, then ReLU unless `act=False` (the last norm of a block, before the sum)."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(GROUPS, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


class Stem(nn.Module):
    """ "imagenet": 7x7/2 convolution and 3x3/2 max-pool (stride 4); "small": 3x3/1, no pool."""

    def __init__(self, in_channels: int, width: int, kind: str) -> None:
        super().__init__()
        self.pool = kind == "imagenet"
        kernel, stride = (7, 2) if self.pool else (3, 1)
        self.conv = StdConv2d(in_channels, width, kernel, stride)
        self.norm = GroupNormAct(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        if self.pool:  # pads with -inf, so padding never wins the max
            x = F.max_pool2d(_pad_same(x, 3, 2, value=float("-inf")), 3, 2)
        return x


class Downsample(nn.Module):
    """The projection shortcut: 1x1 convolution (with the block's stride) and GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = StdConv2d(in_channels, out_channels, 1, stride)
        self.norm = GroupNormAct(out_channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand (x4), added to the shortcut, then ReLU."""

    def __init__(self, in_channels: int, mid: int, stride: int) -> None:
        super().__init__()
        out = 4 * mid
        needs_projection = stride != 1 or in_channels != out
        self.downsample = Downsample(in_channels, out, stride) if needs_projection else None
        self.conv1 = StdConv2d(in_channels, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2d(mid, out, 1)
        self.norm3 = GroupNormAct(out, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stage(nn.Module):
    def __init__(self, in_channels: int, mid: int, depth: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            Bottleneck(in_channels, mid, stride),
            *(Bottleneck(4 * mid, mid, 1) for _ in range(depth - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """Stem + stages; stage i has `layers[i]` bottlenecks of width `width * 2**i` (x4 out)."""

    def __init__(
        self, in_channels: int, layers: tuple[int, ...], width: int = 64, stem: str = "imagenet"
    ) -> None:
        super().__init__()
        self.stem = Stem(in_channels, width, stem)
        stages, channels = [], width
        for i, depth in enumerate(layers):
            mid = width * 2**i
            stages.append(Stage(channels, mid, depth, stride=1 if i == 0 else 2))
            channels = 4 * mid
        self.stages = nn.Sequential(*stages)
        self.out_channels = channels
        if next(self.parameters()).device.type != "meta":  # as in ViT: nothing to initialise
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """He-normal convolutions; each block's last norm starts at zero, so every residual
        block starts as the identity (as in BiT and timm)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.norm3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def resnet_macs(in_channels: int, layers: tuple[int, ...], width: int, stem: str, size: int) -> int:
    """Multiply-adds of the convolutions for one size x size image."""
    if stem == "imagenet":
        size = math.ceil(size / 2)
        macs = size * size * 49 * in_channels * width
        size = math.ceil(size / 2)
    else:
        macs = size * size * 9 * in_channels * width
    channels = width
    for i, depth in enumerate(layers):
        mid = width * 2**i
        for j in range(depth):
            out_size = math.ceil(size / 2) if i > 0 and j == 0 else size
            macs += size * size * channels * mid  # conv1 (1x1) at the input resolution
            macs += out_size * out_size * (9 * mid * mid + mid * 4 * mid)  # conv2, conv3
            if j == 0:
                macs += out_size * out_size * channels * 4 * mid  # projection shortcut
            channels, size = 4 * mid, out_size
    return macs
