"""`vitkit export`: a model directory as an ONNX file, checked on real images; a CLIP's text
tower as a second file, checked on texts."""

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
from vitkit.data.text import Tokenizer
from vitkit.infer.predict import expand_inputs
from vitkit.infer.zero_shot import load_tokenizer
from vitkit.model.text import TextTransformer
from vitkit.model.vit import ViT
from vitkit.rundir import TRAIN_CONFIG_FILE
from vitkit.weights.clip import is_clip, load_clip
from vitkit.weights.format import CheckpointError, load_model, resolve_model_dir

if TYPE_CHECKING:
    from vitkit.export.onnx import Parity, TextParity

# The exported fp32 file must give the PyTorch logits to within this (absolute); float32
# kernels that only sum in another order stay around 1e-5.
PARITY_TOLERANCE = 1e-3
# Test images of the model's own training data used for the check when none are given.
DEFAULT_CHECK_IMAGES = 64
# Texts a CLIP's text tower is checked on when none are given: short and long (cut at the
# context length), empty, punctuation, digits, non-Latin scripts; run in one batch and alone.
DEFAULT_CHECK_TEXTS = (
    "a photo of a cat.",
    "a photo of a dog.",
    "",
    "A diagram of a bicycle, drawn in pencil, with every spoke and gear labelled by hand. " * 4,
    "2 red apples & 3 green pears!!",
    "un chat noir sur un canapé",
    "東京の夜景",
    "an emoji 🐈 and a tab\there",
)
MAX_CHECK_TEXTS = 1000
MAX_CHECK_TEXT_CHARS = 10_000


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
        "read-only or shipped. A CLIP's text tower goes beside it (m.onnx: m.text.onnx); "
        "with --tower text, to FILE itself",
    )
    p.add_argument(
        "--tower",
        choices=["image", "text", "both"],
        help="a CLIP's towers to export (default: both; other models have only the image "
        "one). The image file gives the unnormalised image embeddings (B, E) for images "
        "(B, C, H, W); the text file the unnormalised text embeddings (B, E) for token ids "
        "(B, context_length) int64, any batch size, its tokenizer.json in its metadata",
    )
    p.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="the image file accepts any batch size (default: 1; the text file always does)",
    )
    p.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write m.int8.onnx (and m.text.int8.onnx) beside m.onnx, with int8 weights",
    )
    p.add_argument(
        "--check",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="images to compare ONNX and PyTorch logits on (default: test images of the "
        "dataset the model was trained on, if it can be found)",
    )
    p.add_argument(
        "--check-text",
        action="append",
        metavar="TEXT",
        help="a text to compare a CLIP's text tower file and PyTorch on (repeatable; default: "
        f"{len(DEFAULT_CHECK_TEXTS)} varied texts)",
    )
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    try:
        return _export(args)
    except (CheckpointError, ValueError, OSError) as e:  # DatasetError is a ValueError
        return fail("export", str(e))


def _export(args: argparse.Namespace) -> int:
    directory = resolve_model_dir(args.model)
    clip = is_clip(directory)
    tower = args.tower or ("both" if clip else "image")
    if tower != "image" and not clip:
        raise ValueError(
            f"{directory}: not a CLIP (no text tower), so --tower {tower} has nothing to export"
        )
    if tower == "text" and args.check:
        raise ValueError("--check takes images, and --tower text exports no image tower")
    if tower == "image" and args.check_text:
        raise ValueError("--check-text takes texts for a CLIP's text tower, not exported here")
    out = args.out or default_out(directory, "onnx")
    image_out = None if tower == "text" else out
    text_out = None if tower == "image" else out if tower == "text" else _text_name(out)
    planned = [p for p in (image_out, text_out) if p is not None]
    planned += [_int8_name(p) for p in planned] if args.int8 else []
    for path in planned:
        _check_writable(path)

    failed: list[str] = []
    if text_out is None:
        _export_image(args, load_model(directory), directory, image_out, False, failed)
    else:
        clip_model, tokenizer_file = load_clip(directory)
        tokenizer = load_tokenizer(clip_model, tokenizer_file)
        ids, source = _check_texts(args.check_text, tokenizer)  # before exporting anything
        if image_out is not None:
            _export_image(args, clip_model.visual, directory, image_out, True, failed)
        _export_text(args, clip_model.text, tokenizer, ids, source, text_out, failed)
    if failed:
        return fail("export", f"{'; '.join(failed)} (tolerance {PARITY_TOLERANCE:.0e})", 1)
    return 0


def _export_image(
    args: argparse.Namespace,
    model: ViT,
    directory: Path,
    out: Path,
    clip: bool,
    failed: list[str],
) -> None:
    """The image tower (or the whole model) to `out`, checked; a failed check goes to
    `failed`."""
    # Heavy (onnx and its runtime load in about a second): imported when this command runs.
    from vitkit.export.onnx import check_onnx, export_onnx, quantize_onnx_int8

    # Images first, so that a bad path fails before anything is exported.
    x, source = _check_inputs(args.check, directory, model.config)
    export_onnx(model, out, dynamic_batch=args.dynamic_batch, opset=args.opset)
    batch = "any batch size" if args.dynamic_batch else "batch size 1"
    if clip:
        c = model.config
        what = (
            f"images -> image embeddings (batch, {c.num_classes}), unnormalised; preprocessing "
            "in its metadata"
        )
    else:
        what = "preprocessing and labels in its metadata"
    print(f"wrote {out} ({_size(out)}, fp32, {batch}; {what})")
    parity = None
    if x is not None:
        parity = check_onnx(model, out, x)
        _print_parity("ONNX fp32", parity, source, clip)
    if args.int8:
        int8_out = _int8_name(out)
        quantize_onnx_int8(out, int8_out)
        print(f"wrote {int8_out} ({_size(int8_out)}, int8 weights, dynamic int8 activations)")
        if x is not None:
            _print_parity("ONNX int8", check_onnx(model, int8_out, x), source, clip)
    if parity is None:
        note("export", f"not checked: {source}; pass --check IMAGE_OR_DIR")
    elif parity.max_abs_diff > PARITY_TOLERANCE:
        failed.append(f"{out} differs from the PyTorch model by {parity.max_abs_diff:.2e}")


def _export_text(
    args: argparse.Namespace,
    text: TextTransformer,
    tokenizer: Tokenizer,
    ids: torch.Tensor,
    source: str,
    out: Path,
    failed: list[str],
) -> None:
    """A CLIP's text tower to `out`, checked on `ids`; a failed check goes to `failed`."""
    # Heavy, as above.
    from vitkit.export.onnx import check_text_onnx, export_text_onnx, quantize_onnx_int8

    c = text.config
    export_text_onnx(text, out, tokenizer, opset=args.opset)
    print(
        f"wrote {out} ({_size(out)}, fp32, any batch size; token ids (batch, "
        f"{c.context_length}) int64 -> text embeddings (batch, {c.embed_dim}), unnormalised; "
        "tokenizer in its metadata)"
    )
    parity = check_text_onnx(text, out, ids)
    _print_text_parity("ONNX text fp32", parity, source)
    if args.int8:
        int8_out = _int8_name(out)
        quantize_onnx_int8(out, int8_out)
        print(f"wrote {int8_out} ({_size(int8_out)}, int8 weights, dynamic int8 activations)")
        _print_text_parity("ONNX text int8", check_text_onnx(text, int8_out, ids), source)
    if parity.max_abs_diff > PARITY_TOLERANCE:
        failed.append(f"{out} differs from the PyTorch text tower by {parity.max_abs_diff:.2e}")


def _text_name(path: Path) -> Path:
    """model.onnx -> model.text.onnx: the text tower's file beside the image tower's."""
    return path.with_name(f"{path.name.removesuffix('.onnx')}.text.onnx")


def _int8_name(path: Path) -> Path:
    return path.with_name(f"{path.name.removesuffix('.onnx')}.int8.onnx")


def _check_texts(texts: list[str] | None, tokenizer: Tokenizer) -> tuple[torch.Tensor, str]:
    """Token ids of the texts to check a text tower file on, and what they are."""
    if texts is None:
        return tokenizer(list(DEFAULT_CHECK_TEXTS)), f"{len(DEFAULT_CHECK_TEXTS)} sample texts"
    if len(texts) > MAX_CHECK_TEXTS:
        raise ValueError(f"--check-text: at most {MAX_CHECK_TEXTS:,} texts, got {len(texts):,}")
    for text in texts:
        if len(text) > MAX_CHECK_TEXT_CHARS:
            raise ValueError(
                f"--check-text: each text at most {MAX_CHECK_TEXT_CHARS:,} characters, got "
                f"{len(text):,}"
            )
    return tokenizer(texts), f"{len(texts)} given text(s)"


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


def _print_parity(what: str, parity: Parity, source: str, embeddings: bool = False) -> None:
    if embeddings:  # a CLIP's image tower: its outputs are embeddings, not class scores
        print(f"  {what} vs PyTorch on {source}: max |embedding diff| {parity.max_abs_diff:.2e}")
        return
    print(
        f"  {what} vs PyTorch on {source}: max |logit diff| {parity.max_abs_diff:.2e}, "
        f"same top-1 on {parity.top1_agreement:.1%}"
    )


def _print_text_parity(what: str, parity: TextParity, source: str) -> None:
    print(
        f"  {what} vs PyTorch on {source}, in one batch and one by one: max |embedding diff| "
        f"{parity.max_abs_diff:.2e}, lowest cosine {parity.min_cosine:.6f}"
    )


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"
