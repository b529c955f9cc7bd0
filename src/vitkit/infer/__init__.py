"""Inference: from logits to labels."""

from vitkit.infer.labels import probabilities, top_k

__all__ = ["probabilities", "top_k"]
