"""`vitkit train` (from scratch) and `vitkit finetune` (from pretrained weights)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vitkit.cli.common import config_overrides, fail
from vitkit.config import PRESETS
from vitkit.train import TrainConfig, load_recipe, train
from vitkit.train.distributed import LostProcessError, launched_size, rank

# TrainConfig fields that a flag of the same name sets.
TRAIN_SETTINGS = (
    "data",
    "data_dir",
    "val_fraction",
    "holdout",
    "stream",
    "workers",
    "image_column",
    "label_column",
    "model",
    "epochs",
    "batch_size",
    "optimizer",
    "muon_kernels",
    "progressive_size",
    "teacher",
    "distill",
    "distill_temperature",
    "progressive_until",
    "lr",
    "max_steps",
    "seed",
    "precision",
    "compile",
    "checkpoint_activations",
    "ema_decay",
    "weight_decay",
    "warmup_epochs",
    "num_classes",
    "layer_decay",
    "grad_accum",
    "shard",
    "save_every",
)


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a ViT from scratch")
    p.add_argument("--recipe", type=Path, help="a TOML recipe (see recipes/); flags override it")
    p.add_argument(
        "--model",
        choices=list(PRESETS),
        metavar="PRESET",
        help="default: a preset suited to the image size",
    )
    _add_training_flags(p)

    p = subparsers.add_parser("finetune", help="fine-tune a pretrained ViT on new data")
    p.add_argument(
        "pretrained",
        metavar="PRETRAINED",
        help="model dir or name, timm weights file, Hugging Face dir or Google .npz",
    )
    p.add_argument("--num-classes", type=int, help="a new, zero-initialised head of this size")
    p.add_argument("--image-size", type=int, help="fine-tune at this resolution")
    p.add_argument("--linear-probe", action="store_true", help="train the head only")
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay, e.g. 0.75")
    p.add_argument("--recipe", type=Path, help="a TOML recipe; flags override it")
    _add_training_flags(p)


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        help="fashion-mnist, mnist, digits, or a collection: an image folder, a manifest "
        "(.csv/.jsonl of path,label), WebDataset shards (a shards.json set, a .tar or a brace "
        "pattern), a Hugging Face dataset (save_to_disk directory, Parquet, hf:NAME)",
    )
    p.add_argument("--data-dir", help="where the dataset's files are (default: searched)")
    p.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="held out of each class of a collection without its own val split (default: 0.1)",
    )
    p.add_argument(
        "--holdout",
        type=int,
        metavar="N",
        help="a named dataset: validate (and pick best/) on N training images, the same ones "
        "every run, and evaluate the test split once at the end (default: 0, validate on it)",
    )
    memory = p.add_mutually_exclusive_group()
    memory.add_argument(
        "--stream",
        action="store_const",
        const=True,
        help="read a collection file by file, each image cropped at full resolution "
        "(default: when it would take more than 5%% of the memory available)",
    )
    memory.add_argument(
        "--in-memory",
        dest="stream",
        action="store_const",
        const=False,
        help="decode a collection into memory at the model's size first",
    )
    p.add_argument("--image-column", help="a Hugging Face dataset's image column")
    p.add_argument("--label-column", help="a Hugging Face dataset's label column")
    p.add_argument(
        "--workers", type=int, help="decoding processes when streaming (default: one per core)"
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per step, over all processes")
    p.add_argument(
        "--grad-accum", type=int, metavar="K", help="K micro-batches a step in each process"
    )
    p.add_argument(
        "--shard", action="store_true", default=None, help="FSDP2 over the processes (torchrun)"
    )
    p.add_argument(
        "--optimizer",
        choices=["adamw", "muon"],
        help="muon: Muon for the encoder blocks' weight matrices, AdamW for the rest, one lr "
        "(default: adamw)",
    )
    p.add_argument(
        "--muon-kernels",
        action="store_true",
        default=None,
        help="with --optimizer muon: the hybrid's CNN kernels follow Muon too (all but the first)",
    )
    p.add_argument(
        "--teacher",
        metavar="MODEL_DIR",
        help="DeiT distillation: this trained model teaches the distillation token's head "
        "(the model needs distilled = true)",
    )
    p.add_argument(
        "--distill",
        choices=["hard", "soft"],
        help="learn the teacher's class (hard, default) or its probabilities (soft)",
    )
    p.add_argument("--distill-temperature", type=float, metavar="T", help="soft: default 1")
    p.add_argument(
        "--progressive-size",
        type=int,
        metavar="PX",
        help="progressive resizing: train the first epochs at PX pixels a side, growing to the "
        "model's size by --progressive-until of the epochs",
    )
    p.add_argument(
        "--progressive-until",
        type=float,
        metavar="F",
        help="the fraction of the epochs by which inputs reach full size (default 0.5)",
    )
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the model (single process; pays for large models, see BENCHMARKS)",
    )
    p.add_argument(
        "--checkpoint-activations",
        action="store_true",
        default=None,
        help="recompute each block's activations in the backward pass: far less memory, "
        "10-25%% more time a step",
    )
    p.add_argument("--ema-decay", type=float, help="keep an EMA of weights (e.g. 0.999)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a ViTConfig override")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<data>-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run")
    p.add_argument(
        "--save-every",
        type=float,
        metavar="MINUTES",
        help="save the training state this often within an epoch (default: 5; and at every "
        "epoch's end, on Ctrl-C and on SIGTERM)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        cfg, out, resume = TrainConfig(max_steps=args.max_steps), args.resume, True
    else:
        cfg, out, resume = _config(args), args.out, False
        if out is None and launched_size() > 1:  # each process would stamp its own time
            raise ValueError("several processes train one run: name its directory with --out")
        out = out or Path("runs") / f"{Path(cfg.data).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        result = train(cfg, out, resume=resume, progress=not args.quiet)
    except LostProcessError as e:
        return fail(args.command, str(e), 1)
    if rank() == 0:
        acc = f"{result.val_acc:.4f}" if result.val_acc is not None else "n/a"
        first = result.first_step_seconds
        test = result.test_acc
        print(
            f"{result.run_dir}: step {result.step}/{result.total_steps}, held-out accuracy "
            f"{acc}, {result.seconds / 60:.1f} min"
            + (f" (first step after {first:.1f} s)" if first is not None else "")
            + (f"; test acc (final weights, evaluated once) {test:.4f}" if test is not None else "")
        )
    if result.stop_signal is not None:  # the shell's convention: 128 + the signal's number
        return 128 + result.stop_signal
    return 0


def _config(args: argparse.Namespace) -> TrainConfig:
    """The recipe's settings, if any, with the flags given on top."""
    settings = load_recipe(args.recipe).config.to_dict() if args.recipe else {}
    if args.command == "finetune":
        settings |= {"init": args.pretrained, "linear_probe": args.linear_probe}
    for flag in TRAIN_SETTINGS:
        if getattr(args, flag, None) is not None:
            settings[flag] = getattr(args, flag)
    overrides = config_overrides(args, ("image_size",) if args.command == "finetune" else ())
    settings["model_overrides"] = settings.get("model_overrides", {}) | overrides
    return TrainConfig.from_dict(settings)
