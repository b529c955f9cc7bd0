"""`vitkit export`: a model directory as an ONNX file, checked on real images."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vitkit.cli.common import default_out, fail, note, trained_val_fraction, training_settings
from vitkit.config import ViTConfig
from vitkit.data import load_dataset
from vitkit.data.preprocess import centre_crop, load_image, preprocess
from vitkit.infer.predict import expand_inputs
from vitkit.rundir import TRAIN_CONFIG_FILE
from vitkit.weights.format import CheckpointError, load_model, resolve_model_dir

if TYPE_CHECKING:
    from vitkit.export.onnx import Parity

# The exported fp32 file must give the PyTorch logits to within this (absolute); float32
# kernels that only sum in another order stay around 1e-5.
PARITY_TOLERANCE = 1e-3
# Test images of the model's own training data used for the check when none are given.
DEFAULT_CHECK_IMAGES = 64


def add_export_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="export to ONNX (and int8), checked against PyTorch on real images"
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model directory or shipped model name")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="only onnx so far")
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="default: MODEL_DIR/model.onnx, or ./MODEL.onnx if the model directory is "
        "read-only or shipped",
    )
    p.add_argument(
        "--dynamic-batch", action="store_true", help="accept any batch size (default: 1)"
    )
    p.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    p.add_argument(
        "--int8", action="store_true", help="also write FILE.int8.onnx, with int8 weights"
    )
    p.add_argument(
        "--check",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="images to compare ONNX and PyTorch logits on (default: test images of the "
        "dataset the model was trained on, if it can be found)",
    )
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    try:
        return _export(args)
    except (CheckpointError, ValueError, OSError) as e:  # DatasetError is a ValueError
        return fail("export", str(e))


def _export(args: argparse.Namespace) -> int:
    # Heavy (onnx and its runtime load in about a second): imported when this command runs.
    from vitkit.export.onnx import check_onnx, export_onnx, quantize_onnx_int8

    directory = resolve_model_dir(args.model)
    model = load_model(directory)
    out = args.out or default_out(directory, "onnx")
    int8_out = out.with_name(f"{out.name.removesuffix('.onnx')}.int8.onnx")
    for path in (out, int8_out) if args.int8 else (out,):
        _check_writable(path)
    # Images first, so that a bad path fails before anything is exported.
    x, source = _check_inputs(args.check, directory, model.config)

    export_onnx(model, out, dynamic_batch=args.dynamic_batch, opset=args.opset)
    batch = "any batch size" if args.dynamic_batch else "batch size 1"
    print(f"wrote {out} ({_size(out)}, fp32, {batch}; preprocessing and labels in its metadata)")
    parity = None
    if x is not None:
        parity = check_onnx(model, out, x)
        _print_parity("ONNX fp32", parity, source)
    if args.int8:
        quantize_onnx_int8(out, int8_out)
        print(f"wrote {int8_out} ({_size(int8_out)}, int8 weights, dynamic int8 activations)")
        if x is not None:
            _print_parity("ONNX int8", check_onnx(model, int8_out, x), source)
    if parity is None:
        note("export", f"not checked: {source}; pass --check IMAGE_OR_DIR")
    elif parity.max_abs_diff > PARITY_TOLERANCE:
        return fail(
            "export",
            f"{out} differs from the PyTorch model by {parity.max_abs_diff:.2e} "
            f"(tolerance {PARITY_TOLERANCE:.0e})",
            1,
        )
    return 0


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; --out takes a file name")
    parent = path.parent
    while not parent.exists():  # missing folders are created on writing
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write there ({parent} is not a writable directory)")


def _check_inputs(
    paths: list[str] | None, model_dir: Path, config: ViTConfig
) -> tuple[torch.Tensor | None, str]:
    """Normalised real images to check the export on, and what they are (or why none)."""
    c = config
    if paths:
        files = expand_inputs(paths)
        if not files:
            raise ValueError(f"no image files in {', '.join(paths)}")
        crop = centre_crop(c.crop_pct)
        images = torch.stack(
            [load_image(f, c.in_channels, c.image_size, c.interpolation, crop=crop) for f in files]
        )
        return preprocess(images, c), f"{len(files)} given image(s)"
    settings = training_settings(model_dir)
    spec, data_dir = settings.get("data"), settings.get("data_dir")
    if not isinstance(spec, str) or not isinstance(data_dir, str | None):
        return None, f"no {TRAIN_CONFIG_FILE} in {model_dir} naming its training data"
    try:
        # "val" is the held-out split of every kind of dataset (named ones map it to "test").
        held_out = load_dataset(
            spec,
            "val",
            data_dir=data_dir,
            image_size=c.image_size,
            channels=c.in_channels,
            val_fraction=trained_val_fraction(settings),
            crop_pct=c.crop_pct,
        )
    except (ValueError, OSError) as e:  # DatasetError is a ValueError
        return None, f"its training data is not available ({e})"
    images = held_out.images[:DEFAULT_CHECK_IMAGES]
    return preprocess(images, c), f"{len(images)} held-out {held_out.name or spec} images"


def _print_parity(what: str, parity: Parity, source: str) -> None:
    print(
        f"  {what} vs PyTorch on {source}: max |logit diff| {parity.max_abs_diff:.2e}, "
        f"same top-1 on {parity.top1_agreement:.1%}"
    )


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"
