"""The ViT model: patch embedding, encoder, whole model."""

from vitkit.model.vit import ViT, count_params, flops, resample_pos_embed

__all__ = ["ViT", "count_params", "flops", "resample_pos_embed"]
