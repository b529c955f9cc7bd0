"""`vitkit explain`: a figure of the patches a prediction draws on."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitkit.cli.common import fail
from vitkit.data import DatasetError
from vitkit.infer.explain import METHODS, explain_image
from vitkit.weights.format import load_model, resolve_model_dir


def add_explain_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("explain", help="draw which patches a prediction draws on")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory or shipped model name")
    p.add_argument("image", metavar="IMAGE", help="an image file")
    p.add_argument("--method", choices=METHODS, default="rollout")
    p.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean")
    p.add_argument(
        "--discard-ratio", type=float, default=0.0, help="rollout: drop this share of weakest links"
    )
    p.add_argument("--target", help="grad-rollout: the class to explain (default: the top one)")
    p.add_argument("--out", type=Path, metavar="PNG", help="figure (default: IMAGE.explain.png)")
    p.add_argument("--overlay", type=Path, metavar="PNG", help="also save the bare overlay")
    p.add_argument("--top-k", type=int, default=3)
    p.set_defaults(func=cmd_explain)
    return p


def cmd_explain(args: argparse.Namespace) -> int:
    model = load_model(resolve_model_dir(args.model))
    target = None
    if args.target is not None:
        names = model.labels or []
        if args.target in names:
            target = names.index(args.target)
        elif args.target.isdigit() and int(args.target) < model.config.num_classes:
            target = int(args.target)
        else:
            return fail("explain", f"unknown class {args.target!r}")
    try:
        explanation = explain_image(
            model,
            args.image,
            method=args.method,
            top_k_labels=args.top_k,
            head_fusion=args.head_fusion,
            discard_ratio=args.discard_ratio,
            target=target,
        )
    except DatasetError as e:
        return fail("explain", str(e), 1)
    out = explanation.save(args.out or Path(f"{args.image}.explain.png"))
    if args.overlay:
        explanation.overlay().save(args.overlay)
    labels = ", ".join(f"{name} ({p:.1%})" for name, p in explanation.labels)
    print(f"{args.image}: {labels}")
    print(f"wrote {out}" + (f" and {args.overlay}" if args.overlay else ""))
    return 0
