"""The `vitkit eval`, `vitkit predict` and `vitkit explain` subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vitkit.data.folder import printable
from vitkit.infer.evaluate import EvalReport, evaluate, save_report
from vitkit.infer.optimize import PRECISIONS, optimize
from vitkit.infer.predict import Classifier, expand_inputs
from vitkit.weights.format import SHIPPED_DIR, load_model, read_json, resolve_model_dir


def add_eval_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="accuracy, per-class accuracy and confusion matrix on a dataset"
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model directory or shipped model name")
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset to evaluate on")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="where datasets are kept")
    p.add_argument(
        "--split",
        default="test",
        help="train or test (default); val, or test, is the held-out part of an image folder",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="the held-out fraction of an image folder without val/ (default: the one the "
        "model's run trained with, else 0.1)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="for eval.json and confusion.png (default: MODEL_DIR/eval, or ./eval-NAME if "
        "the model directory is read-only or shipped)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_precision_argument(p, "fp32")
    p.set_defaults(func=cmd_eval)
    return p


def add_predict_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="classify image files")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory or shipped model name")
    p.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders of them"
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON lines, one object per image")
    add_precision_argument(p, "auto")
    p.set_defaults(func=cmd_predict)
    return p


def add_precision_argument(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help=f"inference precision (default: {default}); auto: the fastest mode that keeps "
        "accuracy on this hardware (bf16, or int8 for longer work), fp32: exact",
    )


def add_explain_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from vitkit.infer.explain import METHODS

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
    from vitkit.data import DatasetError
    from vitkit.infer.explain import explain_image

    model = load_model(resolve_model_dir(args.model))
    target = None
    if args.target is not None:
        names = model.labels or []
        if args.target in names:
            target = names.index(args.target)
        elif args.target.isdigit() and int(args.target) < model.config.num_classes:
            target = int(args.target)
        else:
            print(f"vitkit explain: error: unknown class {args.target!r}", file=sys.stderr)
            return 2
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
        print(f"vitkit explain: error: {e}", file=sys.stderr)
        return 1
    out = explanation.save(args.out or Path(f"{args.image}.explain.png"))
    if args.overlay:
        explanation.overlay().save(args.overlay)
    labels = ", ".join(f"{name} ({p:.1%})" for name, p in explanation.labels)
    print(f"{args.image}: {labels}")
    print(f"wrote {out}" + (f" and {args.overlay}" if args.overlay else ""))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vitkit.data import load_dataset

    directory = resolve_model_dir(args.model)
    model = load_model(directory).to(args.device)
    c = model.config
    dataset = load_dataset(
        args.data,
        split=args.split,
        data_dir=args.data_dir,
        image_size=c.image_size,
        channels=c.in_channels,
        val_fraction=(
            trained_val_fraction(directory) if args.val_fraction is None else args.val_fraction
        ),
    )
    if dataset.skipped:
        path, reason = dataset.skipped[0]
        print(
            f"vitkit eval: skipped {len(dataset.skipped)} unreadable file(s), first {path}: "
            f"{reason}",
            file=sys.stderr,
        )
    fast = optimize(model, args.precision)
    report = evaluate(fast, dataset, batch_size=args.batch_size)
    out = save_report(report, args.out or _default_out(directory), dataset.classes)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report, f"{dataset.name or args.data} {args.split}, {fast.precision}")
        print(f"wrote {out / 'eval.json'} and {out / 'confusion.png'}")
    return 0


def _default_out(model_dir: Path) -> Path:
    """MODEL_DIR/eval, unless that would write into the package or a read-only directory."""
    out = model_dir / "eval"
    shipped = model_dir.resolve().is_relative_to(SHIPPED_DIR)
    if not shipped and os.access(out if out.exists() else model_dir, os.W_OK):
        return out
    return Path(f"eval-{model_dir.name}")


def trained_val_fraction(model_dir: Path) -> float:
    """The fraction of its image folder that the model's training run held out (so that
    evaluation sees the same held-out images), or the default when not known."""
    from vitkit.train.config import TrainConfig
    from vitkit.train.loop import TRAIN_CONFIG_FILE

    try:
        fraction = float(read_json(model_dir / TRAIN_CONFIG_FILE)["val_fraction"])
    except (OSError, ValueError, KeyError, TypeError):
        return TrainConfig.val_fraction
    return fraction if 0.0 < fraction < 1.0 else TrainConfig.val_fraction


def _print_report(report: EvalReport, title: str) -> None:
    print(
        f"{title}: {report.num_images:,} images, top-1 {report.top1:.2%}, "
        f"top-5 {report.top5:.2%}, loss {report.loss:.4f}, "
        f"{report.images_per_second:,.0f} images/s"
    )
    width = max(5, *(len(c) for c in report.per_class))
    print(f"{'class':<{width}}  {'images':>8}  {'accuracy':>8}")
    for (name, accuracy), row in zip(report.per_class.items(), report.confusion, strict=True):
        shown = "-" if accuracy is None else f"{accuracy:.2%}"
        print(f"{name:<{width}}  {sum(row):>8,}  {shown:>8}")


def cmd_predict(args: argparse.Namespace) -> int:
    """Each result printed as soon as its batch is classified, so that an interrupted run has
    shown what it did; file names are escaped in text, exact in JSON."""
    paths = expand_inputs(args.inputs)
    if not paths:
        names = printable(", ".join(args.inputs))
        print(f"vitkit predict: error: no image files in {names}", file=sys.stderr)
        return 2
    classifier = Classifier(
        args.model,
        device=args.device,
        batch_size=args.batch_size,
        precision=args.precision,
        num_images=len(paths),
    )
    failed = False
    for p in classifier.predict_iter(paths, top_k=args.top_k):
        if p.error is not None:
            failed = True
            print(f"vitkit predict: error: {printable(p.error)}", file=sys.stderr, flush=True)
        if args.json:
            row = {
                "path": p.source,
                "predictions": [{"label": lb, "probability": pr} for lb, pr in p.labels],
                "error": p.error,
            }
            print(json.dumps(row), flush=True)
        elif p.error is None:
            labels = ", ".join(f"{lb} ({pr:.1%})" for lb, pr in p.labels)
            print(f"{printable(p.source)}: {labels}", flush=True)
    return 1 if failed else 0
