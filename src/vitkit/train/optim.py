"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters that are never decayed: embeddings and tokens are not weights to shrink, and
# the attention pool's probe (`latent`) is a learnt token like [CLS].
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "latent")


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """Decay weight matrices and kernels; spare norms, biases, position embeddings, tokens.

    With `layer_decay` (fine-tuning), each group's `lr_scale` shrinks geometrically from the
    head down to the embeddings: layer l of L+1 learns at layer_decay ** (L + 1 - l).
    """
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = p.ndim > 1 and name.split(".")[-1] not in _NO_DECAY_NAMES
        layer = _layer_id(name, depth) if layer_decay else 0
        group = groups.setdefault(
            (layer, not decays),
            {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - layer) if layer_decay else 1.0,
            },
        )
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def _layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and head."""
    if name.startswith(("patch_embed.", "cls_token", "dist_token", "reg_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    fused: bool = False,
) -> torch.optim.AdamW:
    """`fused` runs the update as one kernel per parameter group (measured: 3-4% more
    images/s for the 1.5 M-parameter hybrid on 2 CPU cores); it needs plain CPU or CUDA
    tensors, so sharded training keeps the default (foreach) implementation."""
    groups = param_groups(model, weight_decay, layer_decay)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def lr_factor(step: int, total: int, warmup: int, min_factor: float = 0.0) -> float:
    """Linear warmup from ~0 to 1 over `warmup` steps, then cosine decay to `min_factor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
