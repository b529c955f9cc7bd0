"""`vitkit models`: the presets, with their parameter counts and GFLOPs."""

from __future__ import annotations

import argparse

from vitkit.config import PRESETS, ViTConfig
from vitkit.model import count_params, flops


def add_models_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list presets with parameter counts and GFLOPs")
    p.add_argument("--num-classes", type=int, help="head size to count with (default: preset's)")
    p.set_defaults(func=cmd_models)
    return p


def cmd_models(args: argparse.Namespace) -> int:
    w = max(map(len, PRESETS))
    print(
        f"{'preset':<{w}} {'image':>5} {'patch':>5} {'width':>5} {'depth':>5} {'heads':>5} "
        f"{'params':>13} {'GFLOPs':>8}  options"
    )
    for name, cfg in PRESETS.items():
        if args.num_classes is not None:
            cfg = cfg.replace(num_classes=args.num_classes)
        params = count_params(cfg)  # counted on a model built without memory
        line = (
            f"{name:<{w}} {cfg.image_size:>5} {cfg.token_stride:>5} {cfg.width:>5} "
            f"{cfg.depth:>5} {cfg.heads:>5} {params:>13,} {flops(cfg) / 1e9:>8.2f}  "
        )
        print((line + ", ".join(options(cfg))).rstrip())
    print("patch: image pixels per token side (hybrids: the CNN's stride x the patch size)")
    print("GFLOPs: one forward pass of one image, a multiply-add counted as 2.")
    return 0


def options(cfg: ViTConfig) -> list[str]:
    """What sets a preset apart from the paper's ViT, in a few words."""
    named = [
        ("distilled", cfg.distilled),
        (f"{cfg.num_registers} registers", cfg.num_registers),
        ("patch-only positions", cfg.class_token and not cfg.cls_pos_embed),
        ("layer scale", cfg.layer_scale_init is not None),
        ("norm_pre", cfg.norm_pre),
        (cfg.act, cfg.act != "gelu"),
        ("headless", not cfg.num_classes),
        ("mean pool", cfg.pool == "mean"),
        ("attention pool", cfg.pool == "map"),
        ("no [CLS]", not cfg.class_token),
    ]
    return [text for text, present in named if present]
