"""CLIP's text tower, top to bottom.

token ids (B, T)                        (data/text.py: start, tokens, end-of-text, padding)
  -> token embeddings + position embeddings     (B, T, D)
  -> depth x causal pre-norm block              (B, T, D)   encoder.py, as the image tower's
  -> final LayerNorm -> the end-of-text token's features -> projection -> (B, embed_dim)

Causal attention lets each token see only those before it, so the end-of-text token has read
the whole text and padding after it changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from vitkit.config import TextConfig
from vitkit.model.encoder import Block


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.context_length, c.width))
        self.blocks = nn.ModuleList(Block(c, 0.0, causal=True) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.proj = nn.Linear(c.width, c.embed_dim, bias=False)
        if self.pos_embed.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenAI CLIP's: token embeddings std 0.02, positions 0.01, attention and MLP
        weights shrinking with width and depth, the projection std width^-0.5."""
        c = self.config
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        proj_std = c.width**-0.5 * (2 * c.depth) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=c.width**-0.5)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * c.width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.proj.weight, std=c.width**-0.5)

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> normalised token features (B, T, D)."""
        if ids.ndim != 2 or ids.shape[1] > self.config.context_length:
            raise ValueError(
                f"expected token ids (batch, at most {self.config.context_length}), "
                f"got {tuple(ids.shape)}"
            )
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> text embeddings (B, embed_dim), before L2 normalisation."""
        x = self.forward_features(ids)
        # The first end-of-text token (argmax finds the first maximum); a text without one
        # (never from the tokenizer) is read at its first position.
        eot = (ids == self.config.eot_id).int().argmax(dim=-1)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])
