"""`vitkit inspect`: the ViT paper's analyses of a model (Fig. 7): its embedding filters, the
similarity of its position embeddings, and how far and how widely each head attends."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitkit import data
from vitkit.cli.common import (
    default_out,
    fail,
    note,
    trained_val_fraction,
    training_settings,
)
from vitkit.data.sources import source_kind
from vitkit.infer.inspect import inspect_model
from vitkit.model.vit import ViT
from vitkit.weights.clip import is_clip, load_clip
from vitkit.weights.format import load_model, resolve_model_dir

# The paper measures attention distance on 128 images; more barely moves the means.
DEFAULT_IMAGES = 128


def add_inspect_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="embedding filters, position embedding similarity, attention distance and entropy",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model directory or shipped model name")
    p.add_argument(
        "--data",
        metavar="SPEC",
        help="images to measure attention on, as for `vitkit eval` (default: the dataset the "
        "model was trained on, where its train.json names one)",
    )
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="where datasets are kept")
    p.add_argument("--split", default="test", help="the split of --data (default: test)")
    p.add_argument(
        "--images",
        type=int,
        default=DEFAULT_IMAGES,
        metavar="N",
        help=f"a fixed random sample of this many images (default {DEFAULT_IMAGES})",
    )
    p.add_argument(
        "--resample-grid",
        type=int,
        metavar="G",
        help="also show the position embeddings resampled to G x G patches (default: twice "
        "the model's grid)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="for the figures and inspect.json (default: MODEL_DIR/inspect, or ./MODEL.inspect "
        "for a shipped or read-only model)",
    )
    p.set_defaults(func=cmd_inspect)
    return p


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.images < 1:
        raise ValueError(f"--images must be at least 1, got {args.images}")
    if args.resample_grid is not None and args.resample_grid < 1:
        raise ValueError(f"--resample-grid must be at least 1, got {args.resample_grid}")
    directory = resolve_model_dir(args.model)
    model = load_clip(directory)[0].visual if is_clip(directory) else load_model(directory)
    settings = training_settings(directory)
    spec = args.data or settings.get("data")
    if not isinstance(spec, str) or not spec:
        return fail(
            "inspect",
            f"{directory}: no --data given, and no training dataset recorded with the model "
            "(train.json); give --data",
        )
    if args.data is None:
        note("inspect", f"measuring attention on {spec} {args.split}, the model's own dataset")
    data_dir = args.data_dir
    if data_dir is None and spec == settings.get("data"):  # where the training run found it
        data_dir = settings.get("data_dir")
    images = _images(model, spec, args.split, data_dir, trained_val_fraction(settings))
    grid = args.resample_grid or 2 * model.config.grid_size
    result = inspect_model(model, images, args.images, resample_grid=grid)
    out = args.out or default_out(directory, "inspect")
    written = result.save(out)
    print(result.summary())
    print(f"wrote {', '.join(p.name for p in written)} to {out}")
    return 0


def _images(
    model: ViT, spec: str, split: str, data_dir: str | Path | None, val_fraction: float
) -> data.ImageDataset | data.ImageStream:
    """The split to sample from: a collection streamed (only the sampled images are decoded,
    cropped as the model evaluates), a named dataset in memory at its own size (the sample is
    resized as it is preprocessed)."""
    c = model.config
    if source_kind(spec) is not None:
        return data.stream_source(
            spec, split, c.image_size, c.in_channels, val_fraction=val_fraction, crop_pct=c.crop_pct
        )
    return data.load_dataset(
        spec, split, data_dir, channels=c.in_channels, val_fraction=val_fraction
    )
