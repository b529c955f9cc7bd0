"""AdamW with decoupled weight decay on matrices only (or Muon for the encoder's weight
matrices and AdamW for the rest), and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from vitkit.train.muon import Muon

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


def build_optimizers(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    fused: bool = False,
    muon: bool = False,
    muon_kernels: bool = False,
    muon_precision: str = "fp32",
) -> list[torch.optim.Optimizer]:
    """AdamW alone, or with `muon` Muon for the encoder blocks' weight matrices (and with
    `muon_kernels` the CNN stem's convolution kernels too; see `is_muon_weight`) and AdamW for
    everything else. Each group keeps its `lr_scale`, so that one schedule (and layer decay)
    drives both. `muon_precision` is that of Muon's orthogonalisation (`vitkit.train.muon`)."""
    if not muon:
        return [build_optimizer(model, lr, weight_decay, layer_decay, fused)]
    chosen = {
        id(p) for name, p in model.named_parameters() if is_muon_weight(name, p, muon_kernels)
    }
    matrices, rest = [], []
    for group in param_groups(model, weight_decay, layer_decay):
        mine = [p for p in group["params"] if id(p) in chosen]
        others = [p for p in group["params"] if id(p) not in chosen]
        matrices += [group | {"params": mine}] if mine else []
        rest += [group | {"params": others}] if others else []
    # Muon scales each update to the RMS of AdamW's, so the recipe's AdamW lr and weight decay
    # (in the groups) serve it as they are; both decay weights by lr x weight_decay.
    return [
        torch.optim.AdamW(rest, lr=lr, fused=fused or None),
        Muon(matrices, lr=lr, precision=muon_precision),
    ]


def is_muon_weight(name: str, p: torch.Tensor, kernels: bool = False) -> bool:
    """The encoder blocks' weight matrices (attention qkv and proj, MLP fc1 and fc2), and with
    `kernels` the hybrid stem's convolution kernels (orthogonalised as out x in*kh*kw
    matrices) except its first, whose input is pixels rather than features. Embeddings,
    tokens, norms, biases and the head are not hidden-layer weights, which is all Muon is
    meant for."""
    if p.ndim == 2:
        return name.startswith("blocks.")
    return (
        kernels
        and p.ndim == 4
        and name.startswith("patch_embed.backbone.")
        and not name.startswith("patch_embed.backbone.stem.")
    )


def lr_factor(step: int, total: int, warmup: int, min_factor: float = 0.0) -> float:
    """Linear warmup from ~0 to 1 over `warmup` steps, then cosine decay to `min_factor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
