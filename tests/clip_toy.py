"""A toy CLIP for tests: noisy squares of three shades, captioned by their shade, and a LiT
trained on them in seconds (a small random image tower, locked; a new text tower)."""

from __future__ import annotations

from pathlib import Path

import torch

from vitkit import create_model
from vitkit.data import ImageDataset
from vitkit.data.captions import captions_from_labels
from vitkit.model.vit import ViT
from vitkit.train.contrastive import ContrastiveConfig, ContrastiveResult, train_contrastive

SHADES = ["dark", "grey", "bright"]
TEMPLATES = ["a photo of a {} square.", "a {} picture."]


def shades(n: int, seed: int) -> ImageDataset:
    """Noisy images of three brightnesses (classes dark, grey, bright), in turn."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    noise = torch.randint(0, 50, (n, 1, 28, 28), generator=gen)
    pixels = (noise + 100 * labels[:, None, None, None]).to(torch.uint8)
    return ImageDataset(pixels, labels, list(SHADES), "shades")


def small_tower(num_classes: int = 3) -> ViT:
    return create_model(
        "Ti/4@28", seed=0, width=32, heads=2, depth=2, num_classes=num_classes
    ).eval()


def small_config(**overrides) -> ContrastiveConfig:
    settings = {
        "steps": 80,
        "batch_size": 48,
        "lr": 3e-3,
        "warmup_steps": 5,
        "text_width": 32,
        "text_depth": 1,
        "text_heads": 2,
        "vocab_size": 300,
    }
    return ContrastiveConfig(**(settings | overrides))


def train_toy_clip(out: Path, **overrides) -> ContrastiveResult:
    """The toy LiT, saved to `out` as a vitkit CLIP directory."""
    pairs = captions_from_labels(shades(300, 0), TEMPLATES)
    result = train_contrastive(small_tower(), pairs, small_config(**overrides), out, progress=False)
    assert result.losses[-1] < result.losses[0]
    return result
