"""`vitkit eval`: accuracy, per-class accuracy and the confusion matrix on a dataset, by the
model's head, (--knn) by the nearest training images' features, or (--zero-shot, a CLIP) by
the dataset's class names written as text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitkit import data
from vitkit.cli.common import (
    add_precision_argument,
    add_zero_shot_arguments,
    default_out,
    descriptions,
    note,
    templates,
    trained_val_fraction,
    training_settings,
    zero_shot_labels,
)
from vitkit.data.sources import open_source, source_kind
from vitkit.data.stream import decode_all, stream_choice
from vitkit.evaluate import TTA, EvalReport, evaluate, save_report
from vitkit.infer.knn import DEFAULT_K, DEFAULT_TEMPERATURE, check_knn_settings, knn_evaluate
from vitkit.infer.optimize import optimize
from vitkit.infer.zero_shot import load_zero_shot
from vitkit.model.vit import ViT
from vitkit.rundir import CONFUSION_FILE, REPORT_FILE
from vitkit.weights.format import load_model, resolve_model_dir

# Where --knn writes its report inside the default output folder, beside the head's.
KNN_DIR = "knn"
ZERO_SHOT_DIR = "zero-shot"


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
        help="train or test (default); val, or test, is the held-out part of a collection",
    )
    p.add_argument("--image-column", help="a Hugging Face dataset's image column")
    p.add_argument("--label-column", help="a Hugging Face dataset's label column")
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
        help=f"for {REPORT_FILE} and {CONFUSION_FILE} (default: MODEL_DIR/eval, or ./MODEL.eval "
        "if the model directory is read-only or shipped; with --knn or --zero-shot, its knn/ "
        "or zero-shot/ folder)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--tta",
        nargs="+",
        choices=TTA,
        default=[],
        help="test-time augmentation: average each image's probabilities over its mirror "
        "(flip) and/or its shifts by --tta-shift pixels (shift); 2, 5 or 10 forward passes",
    )
    p.add_argument(
        "--tta-shift", type=int, default=2, metavar="PX", help="pixels a shift moves (default 2)"
    )
    add_precision_argument(p, "fp32")
    p.add_argument(
        "--knn",
        action="store_true",
        help="classify by the features instead of the head, trained on nothing: DINO's weighted "
        "k-NN against the features of the training split (fp32)",
    )
    p.add_argument(
        "--k", type=int, default=DEFAULT_K, help=f"neighbours that vote (default {DEFAULT_K})"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        metavar="T",
        help=f"a neighbour's vote weighs exp(similarity / T) (default {DEFAULT_TEMPERATURE})",
    )
    p.add_argument(
        "--zero-shot",
        action="store_true",
        help="a CLIP model: classify by the dataset's class names as text, trained on nothing "
        "(--labels renames them, in the dataset's class order)",
    )
    add_zero_shot_arguments(p)
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    directory = resolve_model_dir(args.model)
    model = load_model(directory).to(args.device)
    c = model.config
    fraction = (
        trained_val_fraction(training_settings(directory))
        if args.val_fraction is None
        else args.val_fraction
    )
    if args.knn:
        if args.tta:
            raise ValueError("--tta averages the head's predictions; not with --knn")
        return _eval_knn(args, model, directory, fraction)
    dataset = _dataset(args, c.image_size, c.in_channels, fraction, c.crop_pct)
    if args.zero_shot:
        model = _zero_shot_model(args, directory, dataset.classes)
    elif any(x is not None for x in (args.labels, args.labels_file, args.template)) or (
        args.descriptions is not None
    ):
        raise ValueError(
            "--labels, --labels-file, --template and --descriptions go with --zero-shot"
        )
    fast = optimize(model, args.precision, num_images=len(dataset))
    report = evaluate(
        fast, dataset, batch_size=args.batch_size, tta=args.tta, tta_shift=args.tta_shift
    )
    _note_unreadable(dataset)
    out_dir = args.out or default_out(directory, "eval")
    if args.zero_shot and args.out is None:
        out_dir = out_dir / ZERO_SHOT_DIR
    out = save_report(report, out_dir, dataset.classes)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        how = f"zero-shot, {fast.precision}" if args.zero_shot else fast.precision
        how += f", test-time augmentation: {' + '.join(report.tta)}" if report.tta else ""
        _print_report(report, f"{dataset.name or args.data} {args.split}, {how}")
        print(f"wrote {out / REPORT_FILE} and {out / CONFUSION_FILE}")
    return 0


def _zero_shot_model(args: argparse.Namespace, directory: Path, classes: list[str]) -> ViT:
    """The CLIP in `directory` as a classifier of the dataset's classes, by their names (or
    the --labels given for them, in the same order)."""
    labels = zero_shot_labels(args) or classes
    if len(labels) != len(classes):
        raise ValueError(
            f"{len(labels)} labels for a dataset of {len(classes)} classes ({', '.join(classes)})"
        )
    model = load_zero_shot(directory, labels, templates(args), descriptions(args))
    model = model.to(args.device)
    note("eval", f"zero-shot: {len(labels)} labels x {len(templates(args))} template(s)")
    return model


def _eval_knn(args: argparse.Namespace, model: ViT, directory: Path, val_fraction: float) -> int:
    """k-NN scores of the evaluated split against a bank of the training split's features."""
    if args.split == "train":
        raise ValueError("--knn scores a held-out split against the training split, not itself")
    if args.precision != "fp32":
        raise ValueError(f"--knn embeds in fp32; --precision {args.precision} is for the head")
    check_knn_settings(args.k, args.temperature)  # before the datasets load
    c = model.config
    bank_args = argparse.Namespace(**{**vars(args), "split": "train"})
    bank = _dataset(bank_args, c.image_size, c.in_channels, val_fraction, c.crop_pct)
    dataset = _dataset(args, c.image_size, c.in_channels, val_fraction, c.crop_pct)
    report = knn_evaluate(model, bank, dataset, args.k, args.temperature, args.batch_size)
    _note_unreadable(bank)
    _note_unreadable(dataset)
    out_dir = args.out or default_out(directory, "eval") / KNN_DIR
    out = save_report(report, out_dir, dataset.classes)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(
            f"{dataset.name or args.data} {args.split}, k-NN (k={report.k}, "
            f"T={report.temperature:g}) on {report.bank_images:,} train images' features: "
            f"{report.num_images:,} images, top-1 {report.top1:.2%}, top-5 {report.top5:.2%}, "
            f"{report.images_per_second:,.0f} images/s"
        )
        _print_classes(report)
        print(f"wrote {out / REPORT_FILE} and {out / CONFUSION_FILE}")
    return 0


def _note_unreadable(dataset: data.ImageDataset | data.ImageStream) -> None:
    """Says how many unreadable files a dataset left out (in memory) or passed over (streamed)."""
    if not dataset.skipped:
        return
    if isinstance(dataset, data.ImageDataset):
        path, reason = dataset.skipped[0]
        note("eval", f"skipped {len(dataset.skipped)} unreadable file(s), first {path}: {reason}")
    else:
        first = next(iter(dataset.skipped))
        note("eval", f"passed over {len(dataset.skipped)} unreadable file(s), first {first}")


def _dataset(
    args: argparse.Namespace, image_size: int, channels: int, val_fraction: float, crop_pct: float
) -> data.ImageDataset | data.ImageStream:
    """The split to score: a collection too large for the memory budget is streamed (as
    training does), any other dataset loaded into memory; a collection's images cropped as
    the model evaluates (`crop_pct`)."""
    if source_kind(args.data) is not None:
        columns = {"image_column": args.image_column, "label_column": args.label_column}
        source = open_source(args.data, args.split, val_fraction=val_fraction, **columns)
        stream, why = stream_choice(len(source), channels, image_size)
        note("eval", f"{args.data}: {why}")
        if stream:
            return data.ImageStream(source, image_size, channels, crop_pct=crop_pct)
        if source_kind(args.data) != "folder":
            return decode_all(source, image_size, channels, crop_pct=crop_pct)
    return data.load_dataset(
        args.data,
        split=args.split,
        data_dir=args.data_dir,
        image_size=image_size,
        channels=channels,
        val_fraction=val_fraction,
        crop_pct=crop_pct,
    )


def _print_report(report: EvalReport, title: str) -> None:
    print(
        f"{title}: {report.num_images:,} images, top-1 {report.top1:.2%}, "
        f"top-5 {report.top5:.2%}, loss {report.loss:.4f}, "
        f"{report.images_per_second:,.0f} images/s"
    )
    _print_classes(report)


def _print_classes(report: EvalReport) -> None:
    width = max(5, *(len(c) for c in report.per_class))
    print(f"{'class':<{width}}  {'images':>8}  {'accuracy':>8}")
    for (name, accuracy), row in zip(report.per_class.items(), report.confusion, strict=True):
        shown = "-" if accuracy is None else f"{accuracy:.2%}"
        print(f"{name:<{width}}  {sum(row):>8,}  {shown:>8}")
