"""ImageNet-1k's class names, for checkpoints with a 1000-class head and no names of their
own (timm, Google)."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def imagenet1k_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard index order (WordNet lemmas)."""
    text = resources.files("vitkit.weights").joinpath("imagenet1k.txt").read_text()
    return text.splitlines()
