"""The `vitkit` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from vitkit.config import PRESETS, ViTConfig

Command = Callable[[argparse.Namespace], int]


def cmd_models(args: argparse.Namespace) -> int:
    from vitkit.model import count_params, flops

    print(
        f"{'preset':<12} {'image':>5} {'patch':>5} {'width':>5} {'depth':>5} {'heads':>5} "
        f"{'params':>13} {'GFLOPs':>8}"
    )
    for name, cfg in PRESETS.items():
        if args.num_classes is not None:
            cfg = cfg.replace(num_classes=args.num_classes)
        params = count_params(cfg)  # counted on a model built without memory
        print(
            f"{name:<12} {cfg.image_size:>5} {cfg.token_stride:>5} {cfg.width:>5} "
            f"{cfg.depth:>5} {cfg.heads:>5} {params:>13,} {flops(cfg) / 1e9:>8.2f}"
        )
    print("patch: image pixels per token side (hybrids: the CNN's stride x the patch size)")
    print("GFLOPs: one forward pass of one image, a multiply-add counted as 2.")
    return 0


_CREATE_FLAGS = ("num_classes", "image_size", "patch_size", "in_channels", "drop_path")


def describe_patches(c: ViTConfig) -> str:
    """`patch 16`, or for a hybrid its CNN and the pixels each token covers."""
    if c.resnet_layers is None:
        return f"patch {c.patch_size}"
    stages = ", ".join(map(str, c.resnet_layers))
    return (
        f"ResNet-v2 ({stages}) {c.resnet_stem} stem + patch {c.patch_size} "
        f"({c.token_stride} px per token)"
    )


def _overrides(args: argparse.Namespace, flags: Sequence[str] = _CREATE_FLAGS) -> dict:
    """ViTConfig fields from dedicated flags and from repeated `--set KEY=VALUE`."""
    out = {}
    for flag in flags:
        if getattr(args, flag) is not None:
            out[flag] = getattr(args, flag)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def cmd_create(args: argparse.Namespace) -> int:
    from vitkit.model.factory import create_model
    from vitkit.weights import save_model

    model = create_model(args.preset, seed=args.seed, **_overrides(args))
    save_model(model, args.out_dir)
    print(
        f"created {args.preset} ({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"in {args.out_dir}"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from vitkit.data.folder import printable
    from vitkit.model import count_params, flops
    from vitkit.weights import load_model
    from vitkit.weights.format import resolve_model_dir

    directory = resolve_model_dir(args.model)
    model = load_model(directory)
    cfg = model.config
    info = {
        "directory": str(directory),
        "parameters": count_params(model),
        "gflops": round(flops(cfg) / 1e9, 3),
        "config": cfg.to_dict(),
        "labels": model.labels,
        "files": {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"{directory}: ViT {cfg.width}w x {cfg.depth} blocks x {cfg.heads} heads, "
        f"{describe_patches(cfg)}, {cfg.image_size}px, {cfg.in_channels} channel(s)"
    )
    print(f"  parameters {info['parameters']:,}   GFLOPs {info['gflops']}")
    print(
        f"  classes {cfg.num_classes}: "
        + (printable(", ".join(model.labels)) if model.labels else "(unnamed)")
    )
    print(f"  pool {cfg.pool}, registers {cfg.num_registers}, mean {cfg.mean}, std {cfg.std}")
    if cfg.source:
        print(f"  from {cfg.source}")
    return 0


# TrainConfig fields that a flag of the same name sets.
_TRAIN_SETTINGS = (
    "data",
    "data_dir",
    "val_fraction",
    "model",
    "epochs",
    "batch_size",
    "lr",
    "max_steps",
    "seed",
    "precision",
    "compile",
    "ema_decay",
    "weight_decay",
    "warmup_epochs",
    "num_classes",
    "layer_decay",
    "grad_accum",
    "shard",
    "save_every",
)


def cmd_train(args: argparse.Namespace) -> int:
    from vitkit.train import TrainConfig, load_recipe, train
    from vitkit.train.distributed import LostProcessError, launched_size, rank

    if args.resume:
        cfg, out, resume = TrainConfig(max_steps=args.max_steps), args.resume, True
    else:
        settings = load_recipe(args.recipe).config.to_dict() if args.recipe else {}
        if args.command == "finetune":
            settings |= {"init": args.pretrained, "linear_probe": args.linear_probe}
        for flag in _TRAIN_SETTINGS:
            if getattr(args, flag, None) is not None:
                settings[flag] = getattr(args, flag)
        overrides = _overrides(args, flags=("image_size",) if args.command == "finetune" else ())
        settings["model_overrides"] = settings.get("model_overrides", {}) | overrides
        cfg, out, resume = TrainConfig.from_dict(settings), args.out, False
        if out is None and launched_size() > 1:  # each process would stamp its own time
            raise ValueError("several processes train one run: name its directory with --out")
        out = out or Path("runs") / f"{Path(cfg.data).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        result = train(cfg, out, resume=resume, progress=not args.quiet)
    except LostProcessError as e:
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 1
    if rank() == 0:
        acc = f"{result.val_acc:.4f}" if result.val_acc is not None else "n/a"
        print(
            f"{result.run_dir}: step {result.step}/{result.total_steps}, held-out accuracy "
            f"{acc}, {result.seconds / 60:.1f} min"
        )
    if result.stop_signal is not None:  # the shell's convention: 128 + the signal's number
        return 128 + result.stop_signal
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from safetensors.torch import save as save_safetensors

    from vitkit.weights import atomic_write, guess_format, load_pretrained, save_model
    from vitkit.weights.hf import to_hf
    from vitkit.weights.timm import to_timm

    source = args.from_ or guess_format(args.src)
    model = load_pretrained(args.src, source, heads=args.heads)
    if args.to == "vitkit":
        save_model(model, args.out_dir)
    elif args.to == "hf":
        to_hf(model, args.out_dir)
    else:
        weights = save_safetensors(to_timm(model), metadata={"format": "pt"})
        atomic_write(Path(args.out_dir) / "model.safetensors", weights)
    c = model.config
    pinned = f" [{c.source}]" if c.source else ""
    print(
        f"{args.src} ({source}){pinned} -> {args.out_dir} ({args.to}): width {c.width}, depth "
        f"{c.depth}, heads {c.heads}, {describe_patches(c)}, {c.image_size}px, "
        f"{c.num_classes} classes"
    )
    return 0


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="fashion-mnist, mnist, digits, or an image folder")
    p.add_argument("--data-dir", help="where the dataset's files are (default: searched)")
    p.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="held out of each class of an image folder without val/ (default: 0.1)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per step, over all processes")
    p.add_argument(
        "--grad-accum", type=int, metavar="K", help="K micro-batches a step in each process"
    )
    p.add_argument(
        "--shard", action="store_true", default=None, help="FSDP2 over the processes (torchrun)"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description=__doc__)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the traceback too (or set VITKIT_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list presets with parameter counts and GFLOPs")
    p.add_argument("--num-classes", type=int, help="head size to count with (default: preset's)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("create", help="build a model from a preset and save it")
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

    p = sub.add_parser("train", help="train a ViT from scratch")
    p.add_argument("--recipe", type=Path, help="a TOML recipe (see recipes/); flags override it")
    p.add_argument(
        "--model",
        choices=list(PRESETS),
        metavar="PRESET",
        help="default: a preset suited to the image size",
    )
    _add_training_flags(p)

    p = sub.add_parser("finetune", help="fine-tune a pretrained ViT on new data")
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

    from vitkit.infer.commands import add_eval_command, add_explain_command, add_predict_command

    add_eval_command(sub)
    add_predict_command(sub)
    add_explain_command(sub)

    from vitkit.infer.export_command import add_export_command
    from vitkit.serve.commands import add_serve_command

    add_export_command(sub)
    add_serve_command(sub)

    from vitkit.benchmark import add_bench_command

    add_bench_command(sub)

    p = sub.add_parser("convert", help="import timm, Hugging Face or Google weights; export")
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

    p = sub.add_parser("info", help="describe a model directory")
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vitkit.runtime import reuse_freed_memory
    from vitkit.weights.format import CheckpointError, one_line

    reuse_freed_memory()
    debug = args.debug or os.environ.get("VITKIT_DEBUG", "0") not in ("", "0")
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader is gone (`vitkit predict ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the final flush
        return 128 + 13  # as if killed by SIGPIPE
    except Exception as e:  # one line naming the problem; the traceback only when asked
        expected = isinstance(e, (CheckpointError, ValueError, FileNotFoundError))
        if debug:
            traceback.print_exc()
        what = "" if expected else f"{type(e).__name__}: "
        hint = "" if expected or debug else " (run with --debug for the traceback)"
        print(f"vitkit {args.command}: error: {what}{one_line(str(e))}{hint}", file=sys.stderr)
        return 2 if expected else 1


if __name__ == "__main__":
    sys.exit(main())
