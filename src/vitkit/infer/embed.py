"""Embeddings: a backbone's pooled features (and, if asked, its patch tokens) for images in
memory, a dataset or a stream, ready for retrieval and k-NN classification (knn.py).

    features = embed_images(model, dataset)              (N, D), each row of unit length
    features, patches = embed_images(model, images, patch_features=True)   + (N, P, D)
    embeddings = embed_images(clip.visual, images, projected=True)   a CLIP's joint space
    embeddings = embed_texts(clip, tokenizer, ["a cat", "a dog"])     its texts, the same space
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vitkit.data.dataset import ImageDataset
from vitkit.data.preprocess import preprocess
from vitkit.data.stream import ImageStream
from vitkit.data.text import Tokenizer
from vitkit.evaluate import MAX_BATCH_PIXELS, dataset_batches
from vitkit.model.clip import CLIP
from vitkit.model.vit import ViT

Images = torch.Tensor | ImageDataset | ImageStream

# Work shorter than this many seconds shows no progress bar.
PROGRESS_DELAY_S = 2.0
# Texts per call of a text tower, and bounds on what a command line or a request may ask
# (texts are kept in the embeddings file's header, which safetensors caps at 100 MB).
TEXT_BATCH = 256
MAX_TEXTS = 100_000
MAX_TEXT_CHARS = 2_000

# The embeddings file `vitkit embed` writes and `vitkit search` reads, a safetensors file.
# Its tensors, float32, each row of unit length (but the patch tokens):
FEATURES = "features"  # (N, D): the images
PATCH_TOKENS = "patch_tokens"  # (N, P, D), if asked for: the images' patch tokens, unpooled
TEXT_FEATURES = "text_features"  # (M, E): a CLIP's texts
# Its metadata entries (strings): the images' paths and the texts as JSON lists (row i of
# FEATURES / TEXT_FEATURES is entry i), the model as given and its directory (absolute), and
# what the image rows are (EMBEDDINGS).
NAMES, TEXTS, MODEL, MODEL_DIR, EMBEDDING = "names", "texts", "model", "model_dir", "embedding"
# ...and `model_fingerprint(model)` of the (image) model that embedded the images.
FINGERPRINT = "model_fingerprint"
# POOLED: the pooled features (the head's input, `embed_images`); CLIP_SPACE: a CLIP's image
# embeddings (`embed_images(..., projected=True)`), comparable with its texts'. Files without
# the entry (written before it) hold pooled features.
POOLED, CLIP_SPACE = "pooled", "clip"
EMBEDDINGS = (POOLED, CLIP_SPACE)


@overload
def embed_images(
    model: ViT,
    images: Images,
    batch_size: int = ...,
    device: str | torch.device | None = ...,
    patch_features: Literal[False] = ...,
    progress: bool = ...,
    projected: bool = ...,
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
    projected: bool = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def embed_images(
    model: ViT,
    images: Images,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    patch_features: bool = False,
    progress: bool = True,
    projected: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The L2-normalised pooled features (N, D) of `images` (the head's input, `forward_head(...,
    pre_logits=True)`), float32 on the CPU; with `patch_features`, the patch tokens (N, P, D)
    that `forward_features` gives too, not pooled and not rescaled.

    With `projected`, the head's output instead, L2-normalised: for a CLIP's image tower, whose
    head is the projection, the image embeddings (N, E) in the space its texts share
    (`CLIP.encode_image`).

    `images`: uint8 (N, C, H, W) or float in [0, 1], any size (preprocessed as the model
    expects), an `ImageDataset` or an `ImageStream`. The model runs on `device` (it is moved
    there; default: where it is). A progress bar shows for work of more than a few seconds.
    """
    features, patches, _ = _embed(
        model, images, batch_size, device, patch_features, progress, projected
    )
    return (features, patches) if patch_features else features


def model_fingerprint(model: nn.Module) -> str:
    """A digest of a model's weights, to tell whether two models are the same: each tensor's
    name, shape and the exact values of up to 64 numbers spread over it (any training moves
    them all), so it costs little for any size. Equal for the same weights on any device and
    whatever vitkit's version adds to configs; not a defence against a forger, only a check
    against mixing up models."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            picks = torch.linspace(0, max(len(flat) - 1, 0), min(len(flat), 64)).long()
            sample = flat[picks.to(flat.device)].float().cpu().numpy()
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()[:32]


def check_texts(texts: Sequence[str]) -> None:
    """Refuse anything but 1 to MAX_TEXTS strings of at most MAX_TEXT_CHARS characters."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a sequence of str")
    if not 0 < len(texts) <= MAX_TEXTS:
        raise ValueError(f"give 1 to {MAX_TEXTS:,} texts, got {len(texts):,}")
    for text in texts:
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(
                f"each text at most {MAX_TEXT_CHARS:,} characters, got one of {len(text):,} "
                f"({text[:30]!r}...)"
            )


@torch.no_grad()
def embed_texts(
    clip: CLIP, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = TEXT_BATCH
) -> torch.Tensor:
    """The L2-normalised embeddings (N, E) of `texts` by a CLIP's text tower
    (`CLIP.encode_text`), float32 on the CPU: comparable by cosine with `embed_images(
    clip.visual, ..., projected=True)`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_texts(texts)
    device = next(clip.text.parameters()).device
    was_training = clip.training
    clip.eval()
    try:
        chunks = [
            clip.encode_text(tokenizer(list(texts[i : i + batch_size])).to(device)).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
    finally:
        clip.train(was_training)
    return torch.cat(chunks)


def embed_dataset(
    model: ViT,
    dataset: ImageDataset | ImageStream,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`embed_images` of a dataset, and the labels of the images embedded: a stream stands the
    next readable file in for an unreadable one, so its labels are read as its batches come."""
    features, _, labels = _embed(model, dataset, batch_size, device, False, progress, False)
    return features, labels


@torch.no_grad()
def _embed(
    model: ViT,
    images: Images,
    batch_size: int,
    device: str | torch.device | None,
    patch_features: bool,
    progress: bool,
    projected: bool,
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
                pooled = model.forward_head(tokens, pre_logits=not projected).float()
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
