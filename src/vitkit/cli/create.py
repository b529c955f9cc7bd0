"""`vitkit create`: a model built from a preset, saved as a model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitkit.cli.common import config_overrides
from vitkit.config import PRESETS
from vitkit.model.factory import create_model
from vitkit.weights import save_model

# ViTConfig fields that a flag of the same name sets.
CREATE_FLAGS = ("num_classes", "image_size", "patch_size", "in_channels", "drop_path")


def add_create_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("create", help="build a model from a preset and save it")
    p.add_argument("preset", choices=list(PRESETS), metavar="PRESET")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--in-channels", type=int)
    p.add_argument("--drop-path", type=float)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any ViTConfig field")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_create)
    return p


def cmd_create(args: argparse.Namespace) -> int:
    model = create_model(args.preset, seed=args.seed, **config_overrides(args, CREATE_FLAGS))
    save_model(model, args.out_dir)
    print(
        f"created {args.preset} ({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"in {args.out_dir}"
    )
    return 0
