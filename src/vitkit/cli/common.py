"""What several subcommands share: where they write when no --out is given, what a model's
training run recorded, the --precision and --set flags, and vitkit's one-line messages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitkit.config import ViTConfig
from vitkit.infer.zero_shot import (
    DEFAULT_TEMPLATES,
    read_descriptions,
    read_labels_file,
    split_labels,
)
from vitkit.rundir import EVAL_DIR, INSPECT_DIR, ONNX_FILE, TRAIN_CONFIG_FILE
from vitkit.runtime import PRECISIONS
from vitkit.train import TrainConfig
from vitkit.weights.format import SHIPPED_DIR, read_json

# What each kind of output is called inside a model directory.
OUTPUT_NAMES = {"eval": EVAL_DIR, "inspect": INSPECT_DIR, "onnx": ONNX_FILE}


def note(command: str, message: str) -> None:
    """A line on stderr in vitkit's form, `vitkit COMMAND: MESSAGE`."""
    print(f"vitkit {command}: {message}", file=sys.stderr, flush=True)


def fail(command: str, message: str, code: int = 2) -> int:
    """Reports an error that a command handles itself, and returns its exit status."""
    note(command, f"error: {message}")
    return code


def default_out(model_dir: Path, kind: str) -> Path:
    """Where `vitkit eval` ("eval", a folder), `vitkit inspect` ("inspect", a folder) and
    `vitkit export` ("onnx", a file) write without --out: inside the model directory
    (MODEL_DIR/eval, MODEL_DIR/model.onnx), or, when the model is one shipped in the package or
    its directory is not writable, ./MODEL.eval or ./MODEL.onnx in the current directory
    (MODEL: the model directory's name)."""
    out = model_dir / OUTPUT_NAMES[kind]
    shipped = model_dir.resolve().is_relative_to(SHIPPED_DIR)
    # An existing output folder is written into; anything else is created in the model dir.
    if not shipped and os.access(out if out.is_dir() else model_dir, os.W_OK):
        return out
    return Path(f"{model_dir.resolve().name}.{kind}")


def training_settings(model_dir: Path) -> dict[str, Any]:
    """The settings of the training run that wrote a model directory (its train.json), or {}
    when it has none that can be read."""
    try:
        settings = read_json(model_dir / TRAIN_CONFIG_FILE)
    except (OSError, ValueError):  # CheckpointError is a ValueError
        return {}
    return settings if isinstance(settings, dict) else {}


def trained_val_fraction(settings: dict[str, Any]) -> float:
    """The fraction of its image folder that a training run (its `training_settings`) held
    out, so that evaluation sees the same held-out images; the default when not known."""
    try:
        fraction = float(settings["val_fraction"])
    except (KeyError, TypeError, ValueError):
        return TrainConfig.val_fraction
    return fraction if 0.0 < fraction < 1.0 else TrainConfig.val_fraction


def add_precision_argument(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help=f"inference precision (default: {default}); auto: the fastest mode that keeps "
        "accuracy on this hardware (bf16, or int8 for longer work), fp32: exact; int8 runs "
        "in oneDNN on CPUs with VNNI or AMX, in ONNX Runtime on CPUs with AVX2 only",
    )


def add_zero_shot_arguments(p: argparse.ArgumentParser) -> None:
    """--labels, --labels-file and --template: classifying with a CLIP by writing labels."""
    p.add_argument(
        "--labels",
        metavar="A,B,...",
        help='a CLIP model: classify into these comma-separated labels ("cat,dog,a red car")',
    )
    p.add_argument(
        "--labels-file",
        metavar="FILE",
        help="a CLIP model: the labels, one per line (or a JSON list)",
    )
    p.add_argument(
        "--template",
        action="append",
        metavar="TEXT",
        help='a prompt with {} for the label (default: "a photo of a {}."); repeat it to '
        "average several, as CLIP's authors do",
    )
    add_descriptions_argument(p)


def add_descriptions_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--descriptions",
        metavar="FILE",
        help='a JSON file of sentences describing each label ({"Sandal": ["a shoe fastened by '
        "straps to the foot\"], ...}), averaged with the label's prompts",
    )


def zero_shot_labels(args: argparse.Namespace) -> list[str] | None:
    """The labels of --labels or --labels-file, or None when neither is given."""
    if args.labels is not None and args.labels_file is not None:
        raise ValueError("give --labels or --labels-file, not both")
    if args.labels_file is not None:
        return read_labels_file(args.labels_file)
    return None if args.labels is None else split_labels(args.labels)


def templates(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.template) if args.template else DEFAULT_TEMPLATES


def descriptions(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """The labels' descriptions of --descriptions, or None when it is not given."""
    return None if args.descriptions is None else read_descriptions(args.descriptions)


def config_overrides(args: argparse.Namespace, flags: Sequence[str]) -> dict[str, Any]:
    """ViTConfig fields from dedicated flags and from repeated `--set KEY=VALUE`."""
    out = {}
    for flag in flags:
        if getattr(args, flag) is not None:
            out[flag] = getattr(args, flag)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def describe_patches(c: ViTConfig) -> str:
    """`patch 16`, or for a hybrid its CNN and the pixels each token covers."""
    if c.resnet_layers is None:
        return f"patch {c.patch_size}"
    stages = ", ".join(map(str, c.resnet_layers))
    return (
        f"ResNet-v2 ({stages}) {c.resnet_stem} stem + patch {c.patch_size} "
        f"({c.token_stride} px per token)"
    )
