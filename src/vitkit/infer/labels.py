"""The last step of the path: logits -> softmax probabilities -> top-k (label, probability)."""

from __future__ import annotations

import torch


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes, computed in fp32 whatever the logits' dtype."""
    return logits.float().softmax(dim=-1)


def top_k(
    logits: torch.Tensor, k: int = 5, labels: list[str] | None = None
) -> list[list[tuple[str, float]]]:
    """For each row of `logits` (B, C), the k most probable `(label, probability)` pairs.

    Without `labels`, a class is named by its index.
    """
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (B, classes), got {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if labels is not None and len(labels) != logits.shape[1]:
        raise ValueError(f"{len(labels)} labels for {logits.shape[1]} classes")
    probs, idx = probabilities(logits).topk(min(k, logits.shape[1]), dim=-1)
    names = labels or [str(i) for i in range(logits.shape[1])]
    return [
        [(names[i], p) for i, p in zip(row_i.tolist(), row_p.tolist(), strict=False)]
        for row_i, row_p in zip(idx, probs, strict=False)
    ]
