"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters that are never decayed: embeddings and tokens are not weights to shrink.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and kernels; spare norms, biases, position embeddings, tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.split(".")[-1] in _NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def lr_factor(step: int, total: int, warmup: int, min_factor: float = 0.0) -> float:
    """Linear warmup from ~0 to 1 over `warmup` steps, then cosine decay to `min_factor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
