"""`vitkit train-clip`: contrastive image-text training, LiT (a locked pretrained image tower)
or a CLIP from scratch, on captioned images or on a labelled dataset's class names."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vitkit import data
from vitkit.cli.common import add_descriptions_argument, descriptions, note, templates
from vitkit.config import PRESETS, get_preset
from vitkit.data.captions import (
    CaptionedImages,
    captions_from_labels,
    load_captioned_folder,
    load_captioned_shards,
    shard_paths,
)
from vitkit.evaluate import EvalReport, evaluate
from vitkit.files import atomic_write
from vitkit.infer.zero_shot import split_labels, zero_shot_model
from vitkit.model.vit import ViT
from vitkit.train.contrastive import ContrastiveConfig, ContrastiveResult, train_contrastive
from vitkit.weights import load_pretrained

ZERO_SHOT_FILE = "zero_shot.json"
# Sentences describing each class (--descriptions), or None.
Descriptions = dict[str, list[str]] | None


def add_train_clip_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-clip",
        help="train a CLIP on image-caption pairs (LiT: a locked, pretrained image tower)",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="a folder of images with a .txt caption file beside each, WebDataset shards of "
        "image + txt samples (a .tar, a folder of them, or a {000..009} pattern), or with "
        "--template/--classes a labelled dataset (fashion-mnist, an image folder, ...) "
        "captioned by its class names",
    )
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="where datasets are kept")
    tower = p.add_mutually_exclusive_group(required=True)
    tower.add_argument(
        "--image-tower",
        metavar="MODEL",
        help="a pretrained image model (any format vitkit reads), locked unless --unlock-image",
    )
    tower.add_argument(
        "--model",
        choices=list(PRESETS),
        metavar="PRESET",
        help="a new image tower of this preset, trained with the text tower (a CLIP from scratch)",
    )
    p.add_argument("--unlock-image", action="store_true", help="train the image tower too")
    p.add_argument(
        "--classes",
        metavar="A,B,...",
        help="a labelled dataset: caption and train on these classes only; the zero-shot test "
        "afterwards still uses every class, so the others are never-seen labels",
    )
    p.add_argument(
        "--template",
        action="append",
        metavar="TEXT",
        help='caption templates with {} for the class name (default: "a photo of a {}."); '
        "repeat for several",
    )
    add_descriptions_argument(p)
    defaults = ContrastiveConfig()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--embed-dim", type=int, help="the joint space (default: the tower's width)")
    p.add_argument("--text-width", type=int, default=defaults.text_width)
    p.add_argument("--text-depth", type=int, default=defaults.text_depth)
    p.add_argument("--text-heads", type=int, default=defaults.text_heads)
    p.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/clip"), metavar="DIR")
    p.set_defaults(func=cmd_train_clip)
    return p


def cmd_train_clip(args: argparse.Namespace) -> int:
    if args.image_tower is not None:
        tower = load_pretrained(args.image_tower)
    else:
        tower = ViT(get_preset(args.model))
    lock = args.image_tower is not None and not args.unlock_image
    config = ContrastiveConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lock_image=lock,
        embed_dim=args.embed_dim,
        text_width=args.text_width,
        text_depth=args.text_depth,
        text_heads=args.text_heads,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    described = descriptions(args)  # read once: the captions and both reports use it
    pairs, test = _pairs(args, tower, described)
    how = "locked" if lock else "trained"
    note("train-clip", f"{len(pairs):,} captioned images; image tower {how}")
    result = train_contrastive(tower, pairs, config, args.out)
    note("train-clip", f"trained in {result.seconds:.0f} s; wrote {args.out}")
    if test is not None:
        _zero_shot_report(args, result, pairs, test, described)
    return 0


def _pairs(
    args: argparse.Namespace, tower: ViT, described: Descriptions
) -> tuple[CaptionedImages, data.ImageDataset | None]:
    """The training pairs, and for a labelled dataset its test split (for zero-shot)."""
    c = tower.config
    folder = Path(args.data)
    labelled = args.classes is not None or args.template
    if not labelled and folder.is_dir() and next(folder.rglob("*.txt"), None) is not None:
        return load_captioned_folder(folder, c.image_size, c.in_channels, c.crop_pct), None
    shards = None if labelled else shard_paths(args.data)
    if shards is not None:
        return load_captioned_shards(shards, c.image_size, c.in_channels, c.crop_pct), None
    load = {"data_dir": args.data_dir, "image_size": c.image_size, "channels": c.in_channels}
    train = data.load_dataset(args.data, split="train", **load)
    test = data.load_dataset(args.data, split="test", **load)
    classes = split_labels(args.classes) if args.classes else None
    return captions_from_labels(train, templates(args), classes, descriptions=described), test


def _zero_shot_report(
    args: argparse.Namespace,
    result: ContrastiveResult,
    pairs: CaptionedImages,
    test: data.ImageDataset,
    described: Descriptions,
) -> None:
    """Zero-shot accuracy on the test split against every class name: on the classes it
    was trained on and, separately, on those it never saw."""
    model = zero_shot_model(result.clip, result.tokenizer, test.classes, templates(args), described)
    report = evaluate(model, test, batch_size=256)
    seen = set(pairs.labels.unique().tolist()) if pairs.labels is not None else set()
    counts = torch.bincount(test.labels, minlength=len(test.classes))
    correct = torch.tensor([row[i] for i, row in enumerate(report.confusion)])
    groups = {"seen": sorted(seen), "unseen": sorted(set(range(len(test.classes))) - seen)}
    summary: dict[str, object] = {"top1_all": report.top1, "chance": 1 / len(test.classes)}
    for name, classes in groups.items():
        if classes:
            summary[f"top1_{name}"] = (correct[classes].sum() / counts[classes].sum()).item()
            summary[f"{name}_classes"] = [test.classes[i] for i in classes]
    unseen = groups["unseen"]
    if len(unseen) >= 2:  # the classic zero-shot test: the unseen classes' images and labels only
        summary["top1_unseen_only"] = _unseen_only(args, result, test, unseen, described)
        summary["chance_unseen_only"] = 1 / len(unseen)
    summary["per_class"] = report.per_class
    atomic_write(args.out / ZERO_SHOT_FILE, json.dumps(summary, indent=1) + "\n")
    _print_zero_shot(report, summary)


def _unseen_only(
    args: argparse.Namespace,
    result: ContrastiveResult,
    test: data.ImageDataset,
    unseen: list[int],
    described: Descriptions,
) -> float:
    """Top-1 on the images of the unseen classes, choosing among those classes' labels."""
    keep = torch.isin(test.labels, torch.tensor(unseen)).nonzero().flatten()
    remap = torch.full((len(test.classes),), -1, dtype=torch.long)
    remap[unseen] = torch.arange(len(unseen))
    names = [test.classes[i] for i in unseen]
    subset = data.ImageDataset(test.images[keep], remap[test.labels[keep]], names, test.name)
    model = zero_shot_model(result.clip, result.tokenizer, names, templates(args), described)
    return evaluate(model, subset, batch_size=256).top1


def _print_zero_shot(report: EvalReport, summary: dict[str, object]) -> None:
    print(f"zero-shot on {report.num_images:,} test images, all {len(report.per_class)} labels:")
    for name in ("all", "seen", "unseen"):
        if f"top1_{name}" in summary:
            classes = summary.get(f"{name}_classes", [])
            shown = f" ({', '.join(classes)})" if classes else ""
            print(f"  {name:>6}: top-1 {summary[f'top1_{name}']:.2%}{shown}")
    print(f"  chance: {summary['chance']:.2%}")
    if "top1_unseen_only" in summary:
        print(
            f"  unseen images among the unseen labels only: top-1 "
            f"{summary['top1_unseen_only']:.2%} (chance {summary['chance_unseen_only']:.2%})"
        )
