"""Build a ViT from a preset name or a config, optionally seeded."""

from __future__ import annotations

from typing import Any

import torch

from vitkit.config import ViTConfig, get_preset
from vitkit.model.vit import ViT


def create_model(
    preset_or_config: str | ViTConfig, seed: int | None = None, **overrides: Any
) -> ViT:
    """`create_model("S/16", num_classes=10)`; the same `seed` always gives the same weights."""
    if isinstance(preset_or_config, str):
        config = get_preset(preset_or_config)
    elif isinstance(preset_or_config, ViTConfig):
        config = preset_or_config
    else:
        raise TypeError(f"expected a preset name or ViTConfig, got {type(preset_or_config)!r}")
    if overrides:
        config = config.replace(**overrides)
    if seed is None:
        return ViT(config)
    with torch.random.fork_rng(devices=[]):  # seed locally, leave the caller's RNG alone
        torch.manual_seed(seed)
        return ViT(config)
