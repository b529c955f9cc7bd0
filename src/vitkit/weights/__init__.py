"""Checkpoints: vitkit's own format (and, later, converters from other formats)."""

from vitkit.weights.format import CheckpointError, atomic_write, load_model, save_model

__all__ = ["CheckpointError", "atomic_write", "load_model", "save_model"]
