"""Contrastive image-text training: a CLIP from scratch, or LiT (Zhai et al., 2022), a locked
pretrained image tower and a new text tower taught to meet it.

Each step embeds a batch of images and one caption of each, and pulls matching pairs
together against the rest of the batch (CLIP's symmetric cross-entropy over scaled cosine
similarities). Captions made from class names repeat within a batch; identical texts have
identical embeddings, so each counts as a positive of every image it describes (a soft target
shared among them) instead of a negative.

A locked tower's features do not change: LiT embeds every image once, then trains the image
projection, the text tower and the temperature on those features, many steps a second.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vitkit.config import TextConfig
from vitkit.data.captions import CaptionedImages
from vitkit.data.preprocess import preprocess
from vitkit.data.text import Tokenizer, train_tokenizer
from vitkit.files import atomic_write
from vitkit.model.clip import CLIP, MAX_LOGIT_SCALE
from vitkit.model.text import TextTransformer
from vitkit.model.vit import ViT
from vitkit.train.optim import lr_factor
from vitkit.weights.clip import save_clip

SUMMARY_FILE = "contrastive.json"
# Images embedded per call when a locked tower's features are computed.
FEATURE_BATCH = 512


@dataclass
class ContrastiveConfig:
    """A contrastive run's settings; the text tower's sizes are a small BERT-like encoder's."""

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    # LiT: the image tower stays as it is and only its new projection learns.
    lock_image: bool = True
    # The joint space (None: the image tower's width).
    embed_dim: int | None = None
    text_width: int = 128
    text_depth: int = 3
    text_heads: int = 4
    context_length: int = 32
    vocab_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "text_width", "text_depth", "text_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("a contrastive batch needs at least 2 pairs")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("lr must be positive and weight_decay non-negative")
        if not 2 < self.context_length <= 1024:
            raise ValueError(f"context_length must be in 3..1024, got {self.context_length}")


@dataclass
class ContrastiveResult:
    clip: CLIP
    tokenizer: Tokenizer
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    feature_seconds: float = 0.0


def build_clip(image_tower: ViT, tokenizer: Tokenizer, config: ContrastiveConfig) -> CLIP:
    """A CLIP of (a copy of) `image_tower` with a new random projection as its head, and a
    new text tower for `tokenizer`'s vocabulary."""
    visual = copy.deepcopy(image_tower).float()
    embed = config.embed_dim or visual.config.width
    if visual.config.distilled:  # one head for the joint space
        visual.config = visual.config.replace(distilled=False)
    visual.reset_head(embed)
    # Random, not zero as a classifier's: a zero projection has no direction to normalise.
    nn.init.normal_(visual.head.weight, std=visual.config.width**-0.5)
    text = TextTransformer(
        TextConfig(
            vocab_size=tokenizer.vocab_size,
            context_length=config.context_length,
            width=config.text_width,
            depth=config.text_depth,
            heads=config.text_heads,
            embed_dim=embed,
            act="gelu",
            eot_id=tokenizer.eot_id,
        )
    )
    return CLIP(visual, text)


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric loss, normalised embeddings in; equal token rows share a target."""
    logits = scale * image @ text.T
    same = (ids[:, None, :] == ids[None, :, :]).all(dim=-1).float()
    target = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def tower_features(tower: ViT, images: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """A locked tower's pooled features (N, width) for uint8 images, in batches."""
    tower.eval()
    out = []
    for i in tqdm(
        range(0, len(images), FEATURE_BATCH), desc="image features", disable=not progress
    ):
        x = preprocess(images[i : i + FEATURE_BATCH], tower.config)
        out.append(tower.forward_head(tower.forward_features(x), pre_logits=True))
    return torch.cat(out)


def train_contrastive(
    image_tower: ViT,
    pairs: CaptionedImages,
    config: ContrastiveConfig,
    out: str | Path | None = None,
    progress: bool = True,
    features: torch.Tensor | None = None,
) -> ContrastiveResult:
    """Train a CLIP (LiT when `config.lock_image`) on `pairs`; save it to `out` if given.
    `features`: the locked tower's `tower_features` of `pairs.images`, if already computed
    (runs that share a tower and images need them once)."""
    if features is not None and (not config.lock_image or len(features) != len(pairs)):
        raise ValueError("features are for a locked image tower, one row per pair")
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    texts = sorted({c for captions in pairs.captions for c in captions})
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    tokenizer.context_length = config.context_length
    clip = build_clip(image_tower, tokenizer, config)
    # Every distinct caption tokenised once; each image points at its captions' rows.
    row = {text: i for i, text in enumerate(texts)}
    token_rows = tokenizer(texts)
    # Columns after the longest caption's end are padding in every row: not computed.
    used = int((token_rows != tokenizer.pad_id).sum(dim=1).max())
    token_rows = token_rows[:, :used]
    choices = [torch.tensor([row[c] for c in captions]) for captions in pairs.captions]

    feature_start = time.perf_counter()
    if config.lock_image and features is None:
        features = tower_features(clip.visual, pairs.images, progress)
    feature_seconds = time.perf_counter() - feature_start
    if config.lock_image:
        for p in clip.visual.parameters():
            p.requires_grad_(False)
        clip.visual.head.requires_grad_(True)
    trainable = [p for p in clip.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    rest = [p for p in trainable if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(pairs), generator=generator)
    cursor, losses = 0, []
    clip.train()
    if config.lock_image:
        clip.visual.eval()  # no dropout or stochastic depth in a locked tower
    bar = tqdm(range(config.steps), desc="contrastive", unit="step", disable=not progress)
    for step in bar:
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(pairs), generator=generator), 0
        index = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        ids = token_rows[torch.cat([_pick(choices[i], generator) for i in index.tolist()])]
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config.steps, config.warmup_steps)
        if features is not None:
            image = F.normalize(clip.visual.head(features[index]), dim=-1)
        else:
            image = clip.encode_image(preprocess(pairs.images[index], clip.visual.config))
        # Captions made from class names repeat: each distinct one is embedded once.
        distinct, inverse = torch.unique(ids, dim=0, return_inverse=True)
        text = clip.encode_text(distinct)[inverse]
        loss = contrastive_loss(image, text, ids, clip.scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{clip.scale.item():.1f}")
    clip.eval()
    for p in clip.parameters():
        p.requires_grad_(True)
    result = ContrastiveResult(
        clip, tokenizer, losses, time.perf_counter() - start, feature_seconds
    )
    if out is not None:
        save_run(result, config, pairs, Path(out))
    return result


def _pick(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of an image's caption rows, at random."""
    return rows[torch.randint(len(rows), (1,), generator=generator)]


def save_run(
    result: ContrastiveResult, config: ContrastiveConfig, pairs: CaptionedImages, out: Path
) -> None:
    """The CLIP directory, with the run's settings and loss curve beside it."""
    save_clip(result.clip, out, result.tokenizer.to_json())
    summary = {
        "config": asdict(config),
        "pairs": len(pairs),
        "data": pairs.name,
        "seconds": round(result.seconds, 1),
        "feature_seconds": round(result.feature_seconds, 1),
        "final_loss": result.losses[-1] if result.losses else None,
        "losses": [round(v, 4) for v in result.losses],
    }
    atomic_write(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
