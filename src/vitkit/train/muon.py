"""Muon: momentum orthogonalised by Newton-Schulz iterations, for hidden-layer weights.

The update is torch.optim.Muon's (Nesterov momentum, the quintic iteration, decoupled weight
decay, the lr scaled per shape), with two differences that matter on a CPU:
- the iteration runs in bf16 only where the hardware multiplies bf16 natively; elsewhere in
  fp32. torch's always converts to bf16, which a CPU without bf16 dot products emulates:
  measured on a 2-core AVX2 EPYC, its step for the 1.5 M-parameter hybrid took 371 ms, as
  long as the model's forward and backward pass at batch 128 (BENCHMARKS.md);
- kernels of any rank are orthogonalised as (out, in x kh x kw) matrices, as Muon's authors do
  for convolutions, so the hybrid's CNN stem can follow Muon too;
- matrices of one shape (the encoder blocks' qkv, proj, fc1, fc2; the CNN's repeated
  blocks) are orthogonalised together, as one batch of matrix products: a small model's
  dozens of tiny products a step cost more in calls than in arithmetic (measured on a 2-core
  AMX Xeon, the 1.5 M-parameter hybrid's step: 34 ms one by one, BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

# The quintic iteration's coefficients (Keller Jordan's), as in torch.optim.Muon.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def orthogonalize(update: Tensor, precision: str, steps: int = NS_STEPS, eps: float = 1e-7):
    """An approximately orthogonal matrix with `update`'s singular vectors (singular values
    near 1, not exactly: the quintic trades that for speed), in `update`'s dtype. `update` is
    one matrix or a stack of them (n, rows, cols), each orthogonalised on its own."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(NS_PRECISIONS[precision])
    tall = x.size(-2) > x.size(-1)
    if tall:  # the Gram matrix of the shorter side is the cheaper one
        x = x.mT
    # spectral norm <= Frobenius norm <= 1
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    mul_add = torch.baddbmm if x.ndim == 3 else torch.addmm
    for _ in range(steps):
        gram = x @ x.mT
        x = mul_add(x, mul_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon with `adjust_lr_fn="match_rms_adamw"` (Moonshot's "Muon is Scalable for LLM
    Training"): each update is scaled to the RMS of AdamW's, so a recipe's AdamW lr and weight
    decay serve Muon as they are. `precision` is the Newton-Schulz iteration's ("bf16" where
    native, else "fp32"). The state is one momentum buffer per parameter, as torch's."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        precision: str = "fp32",
    ) -> None:
        if precision not in NS_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(NS_PRECISIONS)}")
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError("Muon needs lr >= 0, weight_decay >= 0 and 0 <= momentum < 1")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "precision": precision,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes matrices and kernels, not a {p.ndim}-D tensor")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        by_shape: dict[tuple, list[tuple[Tensor, Tensor, dict]]] = defaultdict(list)
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                matrix = update.reshape(update.size(0), -1)
                by_shape[matrix.shape, matrix.dtype, group["precision"]].append((p, matrix, group))
        for (shape, _, precision), items in by_shape.items():
            if len(items) == 1:
                updates = [orthogonalize(items[0][1], precision)]
            else:
                updates = orthogonalize(torch.stack([m for _, m, _ in items]), precision).unbind()
            for (p, _, group), update in zip(items, updates, strict=True):
                lr = group["lr"]
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.view_as(p), alpha=-lr * 0.2 * math.sqrt(max(shape)))
        return loss
