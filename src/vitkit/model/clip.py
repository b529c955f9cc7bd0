"""CLIP (Radford et al., 2021): a ViT image tower and a text tower trained so that an image
and its caption land close together in one embedding space.

image (B, C, H, W) -> ViT, its head the projection -> (B, E) -> L2 normalise --.
                                                                                 > cosine x scale
token ids (B', T)  -> TextTransformer                -> (B', E) -> L2 normalise -'  = logits (B, B')

Classifying zero-shot is the same product with the texts "a photo of a {label}."
(`ZeroShotHead`): the image tower with a head whose rows are the labels' text embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.model.text import TextTransformer
from vitkit.model.vit import ViT

# CLIP's initial temperature, 0.07, kept as the log of its inverse; its authors clip the
# learnt scale at 100 so that training stays stable.
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0


class CLIP(nn.Module):
    def __init__(self, visual: ViT, text: TextTransformer) -> None:
        super().__init__()
        if visual.config.num_classes != text.config.embed_dim:
            raise ValueError(
                f"the image tower projects to {visual.config.num_classes} dimensions, the "
                f"text tower to {text.config.embed_dim}: they must share one space"
            )
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    @property
    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clipped as in training."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, E) embeddings."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, T) token ids -> (B, E) embeddings."""
        x = self.text(ids)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Images and texts -> logits (B_images, B_texts): scaled cosine similarities."""
        return self.scale * self.encode_image(images) @ self.encode_text(ids).T


class ZeroShotHead(nn.Module):
    """A head that classifies by text: the image tower's projection, L2 normalisation, then
    the cosine with each class's (normalised) text embedding, times CLIP's scale. Its
    `classes` rows are those embeddings already scaled, so one matmul gives the logits."""

    def __init__(self, projection: nn.Module, class_embeddings: torch.Tensor, scale: float):
        super().__init__()
        self.proj = projection
        k, e = class_embeddings.shape
        self.classes = nn.Linear(e, k, bias=False)
        with torch.no_grad():
            self.classes.weight.copy_(F.normalize(class_embeddings.float(), dim=-1) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classes(F.normalize(self.proj(x), dim=-1))
