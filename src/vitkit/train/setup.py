"""A training run's set-up: its data, the model it trains (new, pretrained or resumed), and the
precision it computes in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vitkit.config import ViTConfig, get_preset
from vitkit.data import (
    CALIBRATION_IMAGES,
    ImageDataset,
    ImageStream,
    RandomResizedCrop,
    calibration_sample,
    dataset_stats,
    load_dataset,
)
from vitkit.data.sample_augment import SampleAugment
from vitkit.data.sources import open_source, source_kind
from vitkit.data.stream import decode_all, stream_choice
from vitkit.model.factory import create_model
from vitkit.model.vit import ViT
from vitkit.rundir import STATE_JSON
from vitkit.runtime import auto_bf16
from vitkit.train.checkpoint import SavedState
from vitkit.train.config import TrainConfig
from vitkit.weights import CheckpointError, load_pretrained

# Training or held-out data: in memory, or streamed from an image folder's files.
Data = ImageDataset | ImageStream
# Image folders are decoded to this size unless a preset or recipe says otherwise.
FOLDER_IMAGE_SIZE = 64
# A streamed dataset's normalisation is measured on this many of its images.
STATS_IMAGES = 512
# The held-out images (`holdout`) are drawn with this seed, not the run's: every run and seed
# of a recipe validates on the same images.
HOLDOUT_SEED = 20_240_622
# What a recipe's [model] may change in a pretrained model: regularisation and the evaluation
# crop, not weights.
FINETUNE_OVERRIDES = frozenset({"dropout", "attn_dropout", "drop_path", "crop_pct"})


def default_preset(image_size: int) -> str:
    """A small-image preset suited to the data's size (recipes name their own)."""
    return {28: "Ti/4@28", 32: "Ti/4@32"}.get(image_size, "Ti/4@28")


def model_config(cfg: TrainConfig, train: Data) -> ViTConfig:
    """Preset + recipe overrides, fitted to the data: size, channels, classes, normalisation."""
    base = get_preset(cfg.model or default_preset(train.image_size))
    mean, std = dataset_stats(images_of(train, STATS_IMAGES, cfg.seed))
    std = tuple(s if s > 1e-6 else 1.0 for s in std)  # a constant channel: centre it only
    fitted: dict[str, Any] = {
        "image_size": train.image_size,
        "in_channels": train.channels,
        "num_classes": len(train.classes),
        "mean": mean,
        "std": std,
    }
    if cfg.model is None and train.image_size not in (28, 32):
        fitted["patch_size"] = max(1, train.image_size // 8)  # an 8x8 grid of patches
    return base.replace(**(fitted | cfg.model_overrides))


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    return auto_bf16(device)


def load_splits(
    cfg: TrainConfig, image_size: int | None, channels: int | None = None, crop_pct: float = 1.0
) -> tuple[Data, Data]:
    """Training data and held-out data: a named dataset's test split, or a collection's
    held-out split (`vitkit.data.sources`), in memory or streamed from its files as
    `cfg.stream` says, else as the memory budget allows (the choice and why are printed).
    A collection's held-out images are cropped as the model evaluates (`crop_pct`); decoding
    into memory runs in `cfg.workers` processes too."""
    kwargs = {"data_dir": cfg.data_dir, "image_size": image_size, "channels": channels}
    if source_kind(cfg.data) is None:  # a named dataset or IDX files: small, in memory
        return load_dataset(cfg.data, "train", **kwargs), load_dataset(cfg.data, "val", **kwargs)
    size, chans = image_size or FOLDER_IMAGE_SIZE, channels or 3
    columns = {"image_column": cfg.image_column, "label_column": cfg.label_column}
    # Split by the dataset's fixed seed (as load_dataset): the same held-out part either way.
    train, val = (
        open_source(cfg.data, split, val_fraction=cfg.val_fraction, **columns)
        for split in ("train", "val")
    )
    stream, why = stream_choice(len(train), chans, size, cfg.stream)
    print(f"data: {cfg.data}: training part: {why}", flush=True)
    if not stream:
        return (
            decode_all(train, size, chans, cfg.workers),
            decode_all(val, size, chans, cfg.workers, crop_pct),
        )
    aug = cfg.augment
    crop = RandomResizedCrop(aug.crop_scale, aug.crop_ratio) if aug.random_resized_crop else None
    # Per image in the decoding workers, on 8-bit images: cheaper than batched float ops.
    augment = SampleAugment(aug.hflip, aug.randaugment_ops, aug.randaugment_magnitude)
    return (
        ImageStream(train, size, chans, crop, cfg.seed, cfg.workers, augment=augment),
        ImageStream(val, size, chans, workers=cfg.workers, crop_pct=crop_pct),
    )


def holdout_indices(labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out) of a split, `n` held out, each class in proportion to its
    size, always the same ones (`HOLDOUT_SEED`); both sorted, in the data's order."""
    if not 0 <= n < len(labels):
        raise ValueError(
            f"holdout {n}: must be >= 0 and less than the {len(labels)} training images"
        )
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    shuffled = labels[order]
    # Each image's place within its class (in shuffled order) as a share of the class: the n
    # smallest shares take every class in proportion; ties go by the shuffled order.
    share = torch.empty(len(labels), dtype=torch.float64)
    for c in shuffled.unique():
        members = shuffled == c
        count = int(members.sum())
        share[members] = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    held = torch.zeros(len(labels), dtype=torch.bool)
    held[order[torch.argsort(share, stable=True)[:n]]] = True
    return (~held).nonzero().flatten(), held.nonzero().flatten()


def hold_out(cfg: TrainConfig, train: Data, held: Data) -> tuple[Data, Data, Data | None]:
    """(training, validation, test) data: with `cfg.holdout`, validation is that many training
    images and the held-out split becomes the test split (evaluated once, at the end);
    without, the held-out split validates and there is no test split."""
    if not cfg.holdout:
        return train, held, None
    if not isinstance(train, ImageDataset):
        raise ValueError("holdout needs the training images in memory (a named dataset)")
    kept, val = holdout_indices(train.labels, cfg.holdout)
    return train.subset(kept), train.subset(val), held


def images_of(data: Data, n: int, seed: int = 0) -> torch.Tensor:
    """Up to `n` of the data's uint8 images, a fixed random sample (all, in memory)."""
    if isinstance(data, ImageStream):
        return data.sample(n, seed)
    return data.images


def read_saved(state: SavedState, key: str, parse: Callable[[dict[str, Any]], Any]) -> Any:
    """`parse` of settings a saved state holds, any error in them named by the file."""
    try:
        return parse(state.meta[key])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{state.path / STATE_JSON}: {key}: {e}") from None


def model_and_data(
    cfg: TrainConfig,
    state: SavedState | None,
    datasets: tuple[Data, Data] | None,
) -> tuple[ViT, Data, Data, Data | None]:
    """The model to train and its data (training, validation, test; see `hold_out`): resumed
    from `state`, fine-tuned from `cfg.init`, or new from a preset fitted to the data."""
    if cfg.holdout and source_kind(cfg.data) is not None:  # said before a long decode
        raise ValueError(
            "holdout is for named datasets; a collection validates on val_fraction of its "
            "images (or its own val split)"
        )
    pretrained = load_pretrained(cfg.init) if cfg.init and state is None else None
    if state is not None:
        config = read_saved(state, "model_config", ViTConfig.from_dict)
    else:
        config = pretrained.config if pretrained is not None else None
    size = cfg.model_overrides.get("image_size", config.image_size if config else None)
    if state is not None:
        size = config.image_size
    elif size is None and cfg.model:
        size = get_preset(cfg.model).image_size
    elif size is None and source_kind(cfg.data) is not None:
        size = FOLDER_IMAGE_SIZE
    # A new model's `in_channels` override converts the data (e.g. a folder to grey).
    channels = config.in_channels if config else cfg.model_overrides.get("in_channels")
    crop_pct = cfg.model_overrides.get("crop_pct", config.crop_pct if config else 1.0)
    train_ds, val_ds, test_ds = hold_out(
        cfg, *(datasets or load_splits(cfg, size, channels, crop_pct))
    )
    if pretrained is not None:
        model = _fit_pretrained(pretrained, cfg, train_ds)
    else:
        model = create_model(config or model_config(cfg, train_ds), seed=cfg.seed)
    model.labels = train_ds.classes
    model.calibration = calibration_sample(images_of(train_ds, CALIBRATION_IMAGES), cfg.seed)
    model.set_grad_checkpointing(cfg.checkpoint_activations)
    if cfg.linear_probe:  # train the head only
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("head.", "head_dist.")))
    return model, train_ds, val_ds, test_ds


def _fit_pretrained(model: ViT, cfg: TrainConfig, train: Data) -> ViT:
    """A pretrained model with a head for the data's classes, at the data's resolution."""
    n = len(train.classes)
    if cfg.num_classes is not None:
        if cfg.num_classes != n:
            raise ValueError(f"--num-classes {cfg.num_classes}, but the data has {n} classes")
        model.reset_head(n)
    elif model.config.num_classes != n:
        raise ValueError(
            f"the pretrained head has {model.config.num_classes} classes and the "
            f"data {n}: pass --num-classes {n} for a new head"
        )
    model.set_image_size(train.image_size)  # position embeddings resampled if it differs
    overrides = {k: v for k, v in cfg.model_overrides.items() if k != "image_size"}
    fixed = sorted(set(overrides) - FINETUNE_OVERRIDES)
    if fixed:
        raise ValueError(
            f"a pretrained model's {', '.join(fixed)} cannot change when fine-tuning; "
            f"[model] may set {', '.join(sorted(FINETUNE_OVERRIDES | {'image_size'}))}"
        )
    if overrides:  # regularisation lives in the modules: rebuild them, keep every weight
        tuned = ViT(model.config.replace(**overrides))
        tuned.load_state_dict(model.state_dict())
        model = tuned
    return model
