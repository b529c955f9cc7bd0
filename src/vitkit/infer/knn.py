"""k-NN classification on a backbone's features, DINO's protocol (Caron et al., 2021): each
query's k most cosine-similar features in a bank of labelled training features vote for their
classes, each vote weighted exp(similarity / T); the classes with the most weight win.

    report = knn_evaluate(model, train_set, test_set)        top-1, top-5, per class
    scores = knn_scores(bank, bank_labels, queries, num_classes)   (Q, C), from features

No training: it scores how well the features alone separate the classes, for any backbone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vitkit.data.dataset import ImageDataset
from vitkit.data.stream import ImageStream
from vitkit.evaluate import EvalReport
from vitkit.infer.embed import embed_dataset
from vitkit.model.vit import ViT

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
# Query-by-bank similarities held at once: 64 MiB of float32 (some 280 queries against a
# 60,000-image bank), whatever the number of queries.
MAX_SIMILARITIES = 2**24
# The smallest vote share the loss counts: a true class without a vote among the k would
# otherwise make the mean cross-entropy infinite.
MIN_SHARE = 1e-6


@dataclass
class KnnReport(EvalReport):
    """An `EvalReport` of k-NN classification, with its settings and the bank's size.

    `loss` is the mean cross-entropy of the vote shares (each floored at MIN_SHARE);
    `images_per_second` counts the evaluated images, embedded and classified (the bank's
    embedding excluded).
    """

    k: int
    temperature: float
    bank_images: int


def check_knn_settings(k: int, temperature: float) -> None:
    """Refuse a k below 1 or a temperature that is not positive."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"the temperature must be positive, got {temperature}")


def nearest(bank: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosine similarities (Q, k) of each query's `k` nearest bank rows, largest first,
    and those rows' indices (Q, k); queries are taken a few hundred at a time so that memory
    stays bounded (MAX_SIMILARITIES) for any number of them. `k` is at most the bank's size."""
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"expected features (N, D) and (Q, D), got {tuple(bank.shape)} and "
            f"{tuple(queries.shape)}"
        )
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in 1..{len(bank)} (the bank's size), got {k}")
    queries = queries.to(bank.device, bank.dtype)
    # Dividing the dot products by the bank's norms spares a normalised copy of the bank.
    bank_norms = bank.norm(dim=1).clamp_min(1e-12)
    chunk = max(1, MAX_SIMILARITIES // len(bank))
    sims, indices = [], []
    for q in queries.split(chunk):
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        top = (q @ bank.T / bank_norms).topk(k, dim=1)
        sims.append(top.values)
        indices.append(top.indices)
    return torch.cat(sims), torch.cat(indices)


def vote(
    similarities: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Class scores (Q, C): each neighbour (similarities, labels: (Q, k), most similar first)
    adds exp(similarity / temperature) to its class.

    Every query's votes are divided by its best one's, exp(max / T): the ranking and the vote
    shares are DINO's, and exp cannot overflow at small temperatures.
    """
    check_knn_settings(similarities.shape[1], temperature)
    weights = torch.exp((similarities - similarities[:, :1]) / temperature)
    scores = torch.zeros(len(similarities), num_classes, device=weights.device)
    return scores.scatter_add_(1, labels.to(weights.device), weights.float())


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """Class scores (Q, C) of `queries` (Q, D) by weighted k-NN on `bank` (N, D) with labels
    (N,) in 0..num_classes-1; k is capped at the bank's size. Computed where the bank is."""
    check_knn_settings(k, temperature)
    if bank_labels.shape != (len(bank),):
        raise ValueError(f"{len(bank_labels)} labels for a bank of {len(bank)} features")
    if len(bank) == 0:
        raise ValueError("the bank holds no features")
    if int(bank_labels.min()) < 0 or int(bank_labels.max()) >= num_classes:
        raise ValueError(f"bank labels must be in 0..{num_classes - 1}")
    similarities, indices = nearest(bank, queries, min(k, len(bank)))
    return vote(similarities, bank_labels.to(bank.device)[indices], num_classes, temperature)


def knn_evaluate(
    model: ViT,
    bank: ImageDataset | ImageStream,
    dataset: ImageDataset | ImageStream,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> KnnReport:
    """Score `dataset` by k-NN on `model`'s features of `bank` (the training images, with the
    same classes); the model's head is not used, so any backbone will do."""
    check_knn_settings(k, temperature)
    if bank.classes != dataset.classes:
        raise ValueError(
            f"the bank ({bank.name or 'training images'}) and {dataset.name or 'the dataset'} "
            "name different classes"
        )
    bank_features, bank_labels = embed_dataset(model, bank, batch_size, device, progress)
    start = time.perf_counter()
    features, labels = embed_dataset(model, dataset, batch_size, device, progress)
    where = model.input_spec()[0]
    scores = knn_scores(
        bank_features.to(where), bank_labels, features, len(dataset.classes), k, temperature
    ).cpu()
    elapsed = time.perf_counter() - start
    return _report(
        scores,
        labels,
        dataset.classes,
        min(k, len(bank_labels)),
        temperature,
        len(bank_labels),
        len(labels) / elapsed,
    )


def _report(
    scores: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    k: int,
    temperature: float,
    bank_images: int,
    images_per_second: float,
) -> KnnReport:
    """The report of class `scores` (Q, C) of images with true `labels` (Q,)."""
    n = len(classes)
    top = scores.topk(min(5, n), dim=1).indices
    confusion = torch.bincount(labels * n + top[:, 0], minlength=n * n).view(n, n)
    shares = scores / scores.sum(dim=1, keepdim=True)
    true_share = shares.gather(1, labels[:, None]).clamp_min(MIN_SHARE)
    per_class = confusion.sum(dim=1).tolist()
    return KnnReport(
        top1=(top[:, 0] == labels).sum().item() / len(labels),
        top5=(top == labels[:, None]).any(dim=1).sum().item() / len(labels),
        per_class={
            name: (hit / count if count else None)
            for name, hit, count in zip(
                classes, confusion.diagonal().tolist(), per_class, strict=True
            )
        },
        confusion=confusion.tolist(),
        num_images=len(labels),
        loss=-true_share.log().mean().item(),
        images_per_second=images_per_second,
        k=k,
        temperature=temperature,
        bank_images=bank_images,
    )
