"""`vitkit convert`: timm, Hugging Face or Google weights to vitkit's format, and back out."""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save as save_safetensors

from vitkit.cli.common import describe_patches
from vitkit.weights import atomic_write, guess_format, load_pretrained, save_model
from vitkit.weights.hf import to_hf
from vitkit.weights.timm import to_timm


def add_convert_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="import timm, Hugging Face or Google weights; export")
    p.add_argument("src", metavar="SRC", help="timm weights, Google .npz, HF dir or model dir")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument(
        "--from",
        dest="from_",
        choices=["timm", "hf", "npz", "vitkit"],
        help="format of SRC (default: guessed)",
    )
    p.add_argument("--to", choices=["vitkit", "hf", "timm"], default="vitkit")
    p.add_argument("--heads", type=int, help="attention heads, for timm files of unusual width")
    p.set_defaults(func=cmd_convert)
    return p


def cmd_convert(args: argparse.Namespace) -> int:
    source = args.from_ or guess_format(args.src)
    model = load_pretrained(args.src, source, heads=args.heads)
    if args.to == "vitkit":
        save_model(model, args.out_dir)
    elif args.to == "hf":
        to_hf(model, args.out_dir)
    else:
        weights = save_safetensors(to_timm(model), metadata={"format": "pt"})
        atomic_write(Path(args.out_dir) / "model.safetensors", weights)  # timm's file name
    c = model.config
    pinned = f" [{c.source}]" if c.source else ""
    print(
        f"{args.src} ({source}){pinned} -> {args.out_dir} ({args.to}): width {c.width}, depth "
        f"{c.depth}, heads {c.heads}, {describe_patches(c)}, {c.image_size}px, "
        f"{c.num_classes} classes"
    )
    return 0
