"""See what the model sees: which patches the prediction draws on.

Three maps over the patch grid, each a distribution (it sums to one):

- "rollout" (Abnar & Zuidema, 2020): the attention of every layer, heads fused, with the
  identity added for the residual path and rows renormalised, multiplied from the first layer
  to the last; the [CLS] row says how much each patch flowed into the class token.
- "last-layer": the last layer's [CLS] attention, one map per head (and their mean).
- "grad-rollout": rollout of attention weighted by its gradient for one class (the positive
  part of grad x attention, as in Chefer et al., 2021), so the map is class-specific.

Mean-pooled models have no [CLS]: their maps average the rows of all patch tokens instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitkit.data.preprocess import centre_crop, load_image, preprocess
from vitkit.infer.labels import top_k
from vitkit.model.vit import ViT
from vitkit.plots import new_figure

METHODS = ("rollout", "last-layer", "grad-rollout")
Method = Literal["rollout", "last-layer", "grad-rollout"]
HeadFusion = Literal["mean", "max", "min"]


# -- the maths ---------------------------------------------------------------------------
def fuse_heads(attention: torch.Tensor, how: HeadFusion = "mean") -> torch.Tensor:
    """(B, heads, T, T) -> (B, T, T)."""
    if how == "mean":
        return attention.mean(dim=1)
    if how == "max":
        return attention.amax(dim=1)
    if how == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head fusion must be mean, max or min, got {how!r}")


def discard_lowest(attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest `ratio` of each row's entries (B, T, T); the diagonal is kept, so
    the residual path is never cut."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard ratio must be in [0, 1), got {ratio}")
    k = int(attention.shape[-1] * ratio)
    if k == 0:
        return attention
    cutoff = attention.kthvalue(k, dim=-1, keepdim=True).values
    eye = torch.eye(attention.shape[-1], dtype=torch.bool, device=attention.device)
    return torch.where((attention > cutoff) | eye, attention, torch.zeros_like(attention))


def rollout(
    attentions: list[torch.Tensor], head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout: (B, T, T), row-stochastic, from every layer's (B, heads, T, T)."""
    result = None
    for attention in attentions:
        a = discard_lowest(fuse_heads(attention.float(), head_fusion), discard_ratio)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # the residual path
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    if result is None:
        raise ValueError("no attention maps: the model has no blocks")
    return result


def patch_distribution(rows: torch.Tensor, model: ViT) -> torch.Tensor:
    """From token-to-token weights (..., T, T) to a map over the patch grid (..., gh, gw)
    that sums to one: the [CLS] row, or the mean patch row of a mean-pooled model."""
    c, prefix = model.config, model.config.num_prefix_tokens
    row = rows[..., 0, prefix:] if c.pool == "cls" else rows[..., prefix:, prefix:].mean(dim=-2)
    total = row.sum(dim=-1, keepdim=True)
    # No mass on any patch (e.g. grad-rollout of a zero gradient): say so evenly, not NaN.
    row = torch.where(total > 0, row / total.clamp_min(1e-30), 1.0 / row.shape[-1])
    n = row.shape[-1]
    side = math.isqrt(n)
    grid = (side, n // side)
    return row.reshape(*row.shape[:-1], *grid)


def attention_maps(
    model: ViT,
    x: torch.Tensor,
    method: Method = "rollout",
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    target: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, classes), maps) for normalised images x (B, C, H, W).

    maps: (B, gh, gw) for rollout and grad-rollout; (B, heads, gh, gw) for last-layer. Each
    map sums to one. grad-rollout explains class `target` (default: each image's top class).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    was_training = model.training
    model.eval()
    try:
        if method != "grad-rollout":
            with torch.no_grad():
                logits, attentions = model.forward_with_attention(x)
            if method == "last-layer":
                return logits, patch_distribution(attentions[-1].float(), model)
            matrix = rollout(attentions, head_fusion, discard_ratio)
            return logits, patch_distribution(matrix, model)
        with torch.enable_grad():
            logits, attentions = model.forward_with_attention(x)
            if target is None:
                classes = logits.argmax(dim=-1)
            else:
                classes = torch.full((logits.shape[0],), target, device=logits.device)
            score = logits.gather(1, classes[:, None]).sum()
            grads = torch.autograd.grad(score, attentions)
        weighted = [(g * a).clamp_min(0).detach() for g, a in zip(grads, attentions, strict=True)]
        maps = patch_distribution(rollout(weighted, head_fusion, discard_ratio), model)
        return logits.detach(), maps
    finally:
        model.train(was_training)


# -- images in, pictures out ---------------------------------------------------------------
@dataclass
class Explanation:
    """One image's explanation: what it was, what the model said, where it looked."""

    image: Image.Image  # the image as the model saw it (after crop and resize), RGB
    labels: list[tuple[str, float]]
    heatmap: np.ndarray  # (gh, gw), scaled to [0, 1] for display
    method: str
    head_maps: np.ndarray | None = None  # last-layer: (heads, gh, gw), each scaled to [0, 1]

    def overlay(self, alpha: float = 0.5, min_size: int = 224) -> Image.Image:
        """The heat-map, upsampled to the image and blended over it (RGB); small images are
        first enlarged (nearest neighbour, so pixels stay crisp) to at least `min_size`."""
        image = self.image
        if image.width < min_size:
            scale = -(-min_size // image.width)
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        return _blend(image, self.heatmap, alpha)

    def save(self, path: str | Path) -> Path:
        """A figure: the image, the overlay (with the top labels), and per-head maps."""
        heads = [] if self.head_maps is None else list(self.head_maps)
        cols = 2 + len(heads)
        fig = new_figure(figsize=(2.6 * cols, 3.0), layout="tight")
        axes = fig.subplots(1, cols, squeeze=False)[0]
        axes[0].imshow(self.image)
        axes[0].set_title("input", fontsize=9)
        axes[1].imshow(self.overlay())
        axes[1].set_title(self.method, fontsize=9)
        for i, (ax, m) in enumerate(zip(axes[2:], heads, strict=True)):
            ax.imshow(_blend(self.image, m, 0.6))
            ax.set_title(f"head {i}", fontsize=9)
        for ax in axes:
            ax.axis("off")
        caption = "   ".join(f"{name} {p:.1%}" for name, p in self.labels[:3])
        fig.suptitle(caption, fontsize=10)
        path = Path(path)
        fig.savefig(path, dpi=120)
        return path


def explain_image(
    model: ViT,
    source: str | Path | Image.Image | torch.Tensor,
    method: Method = "rollout",
    top_k_labels: int = 5,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    target: int | None = None,
) -> Explanation:
    """Explain one image (a file, a PIL image, or a uint8/float (C, H, W) tensor)."""

    c = model.config
    if isinstance(source, torch.Tensor):
        pixels = source if source.ndim == 3 else source[None]
        x = preprocess(pixels[None], c)  # resized: show what the model saw, denormalised
        mean, std = torch.tensor(c.mean).view(-1, 1, 1), torch.tensor(c.std).view(-1, 1, 1)
        shown = ((x[0] * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        crop = centre_crop(c.crop_pct)  # as the model was evaluated
        shown = load_image(source, c.in_channels, c.image_size, c.interpolation, crop=crop)
        x = preprocess(shown[None], c)
    param = next(model.parameters())
    logits, maps = attention_maps(
        model, x.to(param.device, param.dtype), method, head_fusion, discard_ratio, target
    )
    image = Image.fromarray(shown.permute(1, 2, 0).squeeze(-1).numpy()).convert("RGB")
    labels = top_k(logits.float(), top_k_labels, model.labels)[0]
    head_maps = None
    if method == "last-layer":
        head_maps = np.stack([_unit(m) for m in maps[0].cpu().numpy()])
        heatmap = _unit(maps[0].mean(dim=0).cpu().numpy())
    else:
        heatmap = _unit(maps[0].cpu().numpy())
    return Explanation(image, labels, heatmap, method, head_maps)


def _unit(m: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1] for display (a constant map becomes all zeros)."""
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _blend(image: Image.Image, heatmap: np.ndarray, alpha: float) -> Image.Image:
    from matplotlib import colormaps  # heavy: imported on first use, as in vitkit.plots

    w, h = image.size
    up = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))[None, None],
        size=(h, w),
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    colour = (colormaps["inferno"](up)[..., :3] * 255).astype(np.uint8)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    mixed = (1 - alpha) * base + alpha * colour.astype(np.float32)
    return Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8))


__all__ = [
    "METHODS",
    "Explanation",
    "attention_maps",
    "explain_image",
    "fuse_heads",
    "patch_distribution",
    "rollout",
]
