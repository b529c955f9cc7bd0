"""`vitkit info`: what a model directory holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitkit import weights
from vitkit.cli.common import describe_patches
from vitkit.config import TextConfig
from vitkit.data.folder import printable
from vitkit.model import count_params, flops
from vitkit.rundir import TEXT_CONFIG_FILE
from vitkit.weights.format import read_json, resolve_model_dir


def add_info_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="describe a model directory")
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return p


def cmd_info(args: argparse.Namespace) -> int:
    directory = resolve_model_dir(args.model)
    model = weights.load_model(directory)
    cfg = model.config
    info = {
        "directory": str(directory),
        "parameters": count_params(model),
        "gflops": round(flops(cfg) / 1e9, 3),
        "config": cfg.to_dict(),
        "labels": model.labels,
        "files": {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()},
    }
    text = _text_tower(directory)
    if text is not None:
        info["text_config"] = text.to_dict()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"{directory}: ViT {cfg.width}w x {cfg.depth} blocks x {cfg.heads} heads, "
        f"{describe_patches(cfg)}, {cfg.image_size}px, {cfg.in_channels} channel(s)"
    )
    print(f"  parameters {info['parameters']:,}   GFLOPs {info['gflops']}")
    if text is not None:  # a CLIP: the head projects into the joint space, no classes
        print(f"  image embedding {cfg.num_classes}-d")
    else:
        print(
            f"  classes {cfg.num_classes}: "
            + (printable(", ".join(model.labels)) if model.labels else "(unnamed)")
        )
    print(f"  pool {cfg.pool}, registers {cfg.num_registers}")
    print(
        f"  preprocessing: {cfg.interpolation} resize, crop_pct {cfg.crop_pct}, "
        f"mean {cfg.mean}, std {cfg.std}"
    )
    if text is not None:
        print(
            f"  CLIP text tower: {text.width}w x {text.depth} blocks x {text.heads} heads, "
            f"{text.vocab_size:,} tokens, context {text.context_length}, joint space "
            f"{text.embed_dim}-d (zero-shot: vitkit predict MODEL IMAGE --labels a,b,c)"
        )
    if cfg.source:
        print(f"  from {cfg.source}")
    return 0


def _text_tower(directory: Path) -> TextConfig | None:
    """A vitkit CLIP directory's text tower config (None for an image model)."""
    path = directory / TEXT_CONFIG_FILE
    return TextConfig.from_dict(read_json(path)) if path.is_file() else None
