"""Embeddings: a backbone's pooled features (and, if asked, its patch tokens) for images in
memory, a dataset or a stream, ready for retrieval and k-NN classification (knn.py).

    features = embed_images(model, dataset)              (N, D), each row of unit length
    features, patches = embed_images(model, images, patch_features=True)   + (N, P, D)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, overload

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitkit.data.dataset import ImageDataset
from vitkit.data.preprocess import preprocess
from vitkit.data.stream import ImageStream
from vitkit.evaluate import MAX_BATCH_PIXELS, dataset_batches
from vitkit.model.vit import ViT

Images = torch.Tensor | ImageDataset | ImageStream

# Work shorter than this many seconds shows no progress bar.
PROGRESS_DELAY_S = 2.0


@overload
def embed_images(
    model: ViT,
    images: Images,
    batch_size: int = ...,
    device: str | torch.device | None = ...,
    patch_features: Literal[False] = ...,
    progress: bool = ...,
) -> torch.Tensor: ...


@overload
def embed_images(
    model: ViT,
    images: Images,
    batch_size: int = ...,
    device: str | torch.device | None = ...,
    *,
    patch_features: Literal[True],
    progress: bool = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def embed_images(
    model: ViT,
    images: Images,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    patch_features: bool = False,
    progress: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The L2-normalised pooled features (N, D) of `images` (the head's input, `forward_head(...,
    pre_logits=True)`), float32 on the CPU; with `patch_features`, the patch tokens (N, P, D)
    that `forward_features` gives too, not pooled and not rescaled.

    `images`: uint8 (N, C, H, W) or float in [0, 1], any size (preprocessed as the model
    expects), an `ImageDataset` or an `ImageStream`. The model runs on `device` (it is moved
    there; default: where it is). A progress bar shows for work of more than a few seconds.
    """
    features, patches, _ = _embed(model, images, batch_size, device, patch_features, progress)
    return (features, patches) if patch_features else features


def embed_dataset(
    model: ViT,
    dataset: ImageDataset | ImageStream,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`embed_images` of a dataset, and the labels of the images embedded: a stream stands the
    next readable file in for an unreadable one, so its labels are read as its batches come."""
    features, _, labels = _embed(model, dataset, batch_size, device, False, progress)
    return features, labels


@torch.no_grad()
def _embed(
    model: ViT,
    images: Images,
    batch_size: int,
    device: str | torch.device | None,
    patch_features: bool,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, patch tokens (empty unless asked for) and labels (-1 for bare tensors)."""
    if not isinstance(model, ViT):
        raise TypeError(f"embeddings need a vitkit ViT, got {type(model).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(images) == 0:
        raise ValueError("no images to embed")
    if device is not None:
        model.to(device)
    device, dtype = model.input_spec()
    batch_size = max(1, min(batch_size, MAX_BATCH_PIXELS // model.config.image_size**2))
    skip = model.config.num_prefix_tokens
    features, patches, labels = [], [], []
    was_training = model.training
    model.eval()
    name = getattr(images, "name", "")
    try:
        with tqdm(
            total=len(images),
            desc=f"embed {name}".strip(),
            unit="img",
            disable=not progress,
            delay=PROGRESS_DELAY_S,
        ) as bar:
            for x, y in _labelled_batches(images, batch_size):
                tokens = model.forward_features(preprocess(x.to(device), model.config).to(dtype))
                pooled = model.forward_head(tokens, pre_logits=True).float()
                features.append(F.normalize(pooled, dim=-1).cpu())
                if patch_features:
                    patches.append(tokens[:, skip:].float().cpu())
                labels.append(y)
                bar.update(len(x))
    finally:
        model.train(was_training)
    return (
        torch.cat(features),
        torch.cat(patches) if patches else torch.empty(0),
        torch.cat(labels),
    )


def _labelled_batches(
    images: Images, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches in order; bare tensors have no labels (-1)."""
    if not isinstance(images, torch.Tensor):
        yield from dataset_batches(images, batch_size)
        return
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got {tuple(images.shape)}")
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        yield x, torch.full((len(x),), -1, dtype=torch.int64)
