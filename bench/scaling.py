"""Scaling on Fashion-MNIST: three encoder sizes x three fractions of the training data, for a
plain ViT and for a hybrid (a small CNN stem, then the same encoder), over several seeds.

    .venv/bin/python bench/scaling.py --out runs/scaling                  # the full grid
    .venv/bin/python bench/scaling.py --epochs 2 --seeds 1 --threads 1    # a quick look

The full grid (3 sizes x 3 fractions x 2 models x 3 seeds, 54 runs of 10 epochs) is 30 times
one seed at one epoch, which took 29 min on one thread of a 2-core AMD EPYC (AVX2) shared with
other work (16 min predicted from its step speeds measured alone): about 8 hours with one
thread, some 5 hours with both cores (estimated, not measured). --epochs, --seeds, --sizes and
--fractions shrink it; the hybrid's runs take three quarters of the time.

Every run trains with the project's own loop (`vitkit.train.train`) and the optimiser settings
of recipes/fashion_mnist_15min.toml (AdamW, lr 2e-3, batch 128, label smoothing 0.1, stochastic
depth 0.05, crop + flip), in fp32, with warmup over the first 10% of the steps. The sizes are
ViTConfigs on 7x7 patches of the 28-pixel images (4x4 = 16 tokens + [CLS]); the hybrid puts a
ResNet-v2 stem (7x7/2 convolution + max-pool, then two stages of one bottleneck, 32 and 64
wide) before the same encoder. Its stride of 8 needs a multiple of 8, so it reads the images
resized to 32 pixels, as the project's hybrid recipes do: a 4x4 map, the same 16 tokens.

A fraction is a fixed subset of the 60,000 training images (stratified by class; seed 0 for
every run, and each smaller subset inside the larger ones); the seeds change the
initialisation, batch order and augmentation only. Every fraction trains for the same number
of epochs, so a smaller fraction also takes fewer steps and sees fewer images: 10% of the data
is 10% of the compute. The accuracy reported is the test top-1 (10,000 images) after the FINAL
epoch, never the best epoch's. Results are written after every run to --out/scaling.json
(--resume carries on from it; --report only tables and plots what it holds, e.g. a grid cut
short), with the plot --out/scaling.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitkit.config import ViTConfig, get_preset
from vitkit.data import ImageDataset, load_dataset
from vitkit.model.vit import ViT, flops
from vitkit.plots import new_figure
from vitkit.runtime import cpu_name
from vitkit.train import TrainConfig, load_recipe, train

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist_15min.toml"
PRESET = "Ti/7@28"
BASE = get_preset(PRESET)
# Three encoders spanning ~11x in parameters (plain ViT), 32 dimensions per head.
SIZES: dict[str, ViTConfig] = {
    "S": BASE.replace(width=32, depth=3, heads=1),
    "M": BASE.replace(width=64, depth=3, heads=2),
    "L": BASE.replace(width=96, depth=4, heads=3),
}
# The hybrid: the CNN makes the tokens (1x1 patches of its 4x4 map at 32 px).
HYBRID = {"image_size": 32, "patch_size": 1, "resnet_layers": (1, 1), "resnet_width": 32}
KINDS = ("vit", "hybrid")
FRACTIONS = (0.1, 0.3, 1.0)
SUBSET_SEED = 0
WARMUP_SHARE = 0.1  # of the run's steps


def model_config(kind: str, size: str) -> ViTConfig:
    config = SIZES[size]
    return config.replace(**HYBRID) if kind == "hybrid" else config


def overrides(config: ViTConfig) -> dict[str, Any]:
    """The fields in which `config` differs from the preset: the training config's [model]."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(BASE, f.name)
    }


def subset(ds: ImageDataset, fraction: float) -> ImageDataset:
    """A fixed share of each class (seed `SUBSET_SEED`): smaller fractions nest in larger ones."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(SUBSET_SEED))
    picked = []
    for c in range(len(ds.classes)):
        of_class = order[ds.labels[order] == c]
        picked.append(of_class[: round(fraction * len(of_class))])
    return ds.subset(torch.cat(picked).sort().values)


def train_config(base: TrainConfig, config: ViTConfig, epochs: int, seed: int) -> TrainConfig:
    return dataclasses.replace(
        base,
        model=PRESET,
        model_overrides=overrides(config),
        epochs=epochs,
        warmup_epochs=WARMUP_SHARE * epochs,
        precision="fp32",
        seed=seed,
    )


def run_one(
    base: TrainConfig,
    config: ViTConfig,
    train_ds: ImageDataset,
    test_ds: ImageDataset,
    epochs: int,
    seed: int,
) -> dict[str, Any]:
    """Train one model from scratch; its final epoch's test top-1 and what it cost."""
    cfg = train_config(base, config, epochs, seed)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        result = train(cfg, run_dir, progress=False, datasets=(train_ds, test_ds))
        seconds = time.perf_counter() - start
    if result.interrupted:  # Ctrl-C or SIGTERM: the loop stopped early and saved
        raise KeyboardInterrupt
    assert result.val_acc is not None
    return {
        "test_acc": result.val_acc,  # after the last epoch
        "best_epoch_acc": result.best_val_acc,  # kept for reference, never reported
        "seconds": seconds,
        "steps": result.step,
        "images_seen": result.step * cfg.batch_size,
    }


def key(run: dict[str, Any]) -> tuple[str, str, float, int]:
    return run["kind"], run["size"], run["fraction"], run["seed"]


def run_grid(
    data: dict[int, tuple[ImageDataset, ImageDataset]],
    sizes: list[str],
    fractions: list[float],
    seeds: list[int],
    epochs: int,
    done: list[dict[str, Any]],
    on_run: Callable[[dict[str, Any]], None],
    base: TrainConfig | None = None,
) -> list[dict[str, Any]]:
    """Every (seed, model, size, fraction) not in `done`, seed by seed (a cut-short grid has
    whole seeds); `data` holds (train, test) by image size. Returns all runs."""
    base = base or load_recipe(RECIPE).config
    runs = list(done)
    have = {key(r) for r in runs}
    for seed in seeds:
        for kind in KINDS:
            for size in sizes:
                config = model_config(kind, size)
                train_full, test = data[config.image_size]
                for fraction in fractions:
                    run = {"kind": kind, "size": size, "fraction": fraction, "seed": seed}
                    if key(run) in have:
                        continue
                    train_ds = subset(train_full, fraction)
                    run |= {"train_images": len(train_ds)}
                    run |= run_one(base, config, train_ds, test, epochs, seed)
                    runs.append(run)
                    on_run(run)
    return runs


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(
    runs: list[dict[str, Any]], sizes: list[str], fractions: list[float]
) -> dict[str, Any]:
    """Per (model, size, fraction): accuracy mean and sd over seeds, seconds; per (size,
    fraction): the gap hybrid - ViT, its mean and the sd of its per-seed values (paired by
    seed: the same data and batch order)."""
    cells, gaps = [], []
    for size in sizes:
        for fraction in fractions:
            by_kind = {}
            for kind in KINDS:
                mine = [r for r in runs if key(r)[:3] == (kind, size, fraction)]
                if not mine:
                    continue
                by_kind[kind] = {r["seed"]: r["test_acc"] for r in mine}
                acc, sd = mean_sd([r["test_acc"] for r in mine])
                seconds = statistics.mean(r["seconds"] for r in mine)
                cells.append(
                    {"kind": kind, "size": size, "fraction": fraction, "seeds": len(mine)}
                    | {"acc_mean": acc, "acc_sd": sd, "seconds_mean": seconds}
                )
            paired = sorted(set(by_kind.get("vit", {})) & set(by_kind.get("hybrid", {})))
            if paired:
                diffs = [by_kind["hybrid"][s] - by_kind["vit"][s] for s in paired]
                gap, sd = mean_sd(diffs)
                gaps.append(
                    {"size": size, "fraction": fraction, "seeds": len(paired)}
                    | {"gap_mean": gap, "gap_sd": sd}
                )
    return {"cells": cells, "gaps": gaps}


def spread(sd: float, n: int) -> str:
    """± the sd in points over n seeds (none for one seed)."""
    return f" ± {sd * 100:.2f} (n={n})" if n > 1 else " (n=1)"


def pct(mean: float, sd: float, n: int) -> str:
    return f"{mean:.2%}" + spread(sd, n)


def gap_text(g: dict[str, Any]) -> str:
    return f"{g['gap_mean'] * 100:+.2f}" + spread(g["gap_sd"], g["seeds"])


def print_tables(
    summary: dict[str, Any], models: dict[str, dict[str, Any]], fractions: list[float]
) -> None:
    cells = {(c["kind"], c["size"], c["fraction"]): c for c in summary["cells"]}
    heads = ["model", "size", "params", "MFLOPs/img"] + [f"{f:.0%} data" for f in fractions]
    heads += [f"s/run {f:.0%}" for f in fractions]
    print("\ntest top-1 after the final epoch, mean ± sd (points) over seeds")
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for name, m in models.items():
        kind, size = name.split("/")
        row = [kind, size, f"{m['params']:,}", f"{m['flops'] / 1e6:.1f}"]
        found = [cells.get((kind, size, f)) for f in fractions]
        if not any(found):
            continue
        row += [pct(c["acc_mean"], c["acc_sd"], c["seeds"]) if c else "-" for c in found]
        row += [f"{c['seconds_mean']:.0f}" if c else "-" for c in found]
        print("| " + " | ".join(row) + " |")
    gaps = {(g["size"], g["fraction"]): g for g in summary["gaps"]}
    sizes = list(dict.fromkeys(g["size"] for g in summary["gaps"]))
    print("\ngap hybrid - ViT, points (mean ± sd of the per-seed differences)")
    print("| size | " + " | ".join(f"{f:.0%} data" for f in fractions) + " |")
    print("|---|" + "---|" * len(fractions))
    for size in sizes:
        found = [gaps.get((size, f)) for f in fractions]
        row = [gap_text(g) if g else "-" for g in found]
        print(f"| {size} | " + " | ".join(row) + " |")


def plot(summary: dict[str, Any], fractions: list[float], path: Path) -> None:
    """Accuracy against the data fraction (log x), one line per size; ViT, hybrid, the gap."""
    fig = new_figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    cells = summary["cells"]
    titles = ("ViT (7x7 patches)", "hybrid (CNN stem + ViT)")
    for ax, kind, title in zip(axes[:2], KINDS, titles, strict=True):
        for size in dict.fromkeys(c["size"] for c in cells):
            mine = sorted(
                (c for c in cells if c["kind"] == kind and c["size"] == size),
                key=lambda c: c["fraction"],
            )
            if mine:
                ax.errorbar(
                    [c["fraction"] for c in mine],
                    [c["acc_mean"] * 100 for c in mine],
                    yerr=[c["acc_sd"] * 100 for c in mine],
                    marker="o",
                    capsize=3,
                    label=size,
                )
        ax.set_title(title)
        ax.set_ylabel("test top-1 after the final epoch (%)")
    low, high = zip(*(ax.get_ylim() for ax in axes[:2]), strict=True)
    for ax in axes[:2]:
        ax.set_ylim(min(low), max(high))
    for size in dict.fromkeys(g["size"] for g in summary["gaps"]):
        mine = sorted(
            (g for g in summary["gaps"] if g["size"] == size), key=lambda g: g["fraction"]
        )
        axes[2].errorbar(
            [g["fraction"] for g in mine],
            [g["gap_mean"] * 100 for g in mine],
            yerr=[g["gap_sd"] * 100 for g in mine],
            marker="o",
            capsize=3,
            label=size,
        )
    axes[2].axhline(0, color="grey", lw=0.8)
    axes[2].set_title("gap: hybrid - ViT")
    axes[2].set_ylabel("points")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("fraction of the 60,000 training images")
        ax.grid(alpha=0.3)
        ax.legend(title="size")
    fig.savefig(path, dpi=120)


def print_answer(summary: dict[str, Any], fractions: list[float]) -> None:
    """The question in figures: how the gap moves from the smallest to the largest fraction."""
    gaps = {(g["size"], g["fraction"]): g for g in summary["gaps"]}
    lo, hi = min(fractions), max(fractions)
    print(f"\nhybrid - ViT from {lo:.0%} to {hi:.0%} of the data (points):")
    for size in dict.fromkeys(g["size"] for g in summary["gaps"]):
        a, b = gaps.get((size, lo)), gaps.get((size, hi))
        if a is None or b is None or lo == hi:
            continue
        change = (b["gap_mean"] - a["gap_mean"]) * 100
        print(f"  {size}: {gap_text(a)} -> {gap_text(b)} ({change:+.2f} as data grows)")


def parse_fraction(text: str) -> float:
    value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1] or a percentage, got {text}")
    return value


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs of every run (default 10)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument(
        "--fractions", nargs="+", type=parse_fraction, default=list(FRACTIONS), help="e.g. 0.1 30%%"
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--out", type=Path, default=Path("runs/scaling"), help="JSON and plot here")
    p.add_argument("--resume", action="store_true", help="keep the runs --out already holds")
    p.add_argument("--report", action="store_true", help="train nothing: report what --out holds")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fractions = sorted(set(args.fractions))
    sizes = [s for s in SIZES if s in args.sizes]
    seeds = list(range(args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = args.out / "scaling.json", args.out / "scaling.png"

    models = {}
    for kind in KINDS:
        for size in sizes:
            config = model_config(kind, size)
            params = sum(t.numel() for t in ViT(config).parameters())
            models[f"{kind}/{size}"] = {
                "params": params,
                "flops": flops(config),
                "config": overrides(config),
            }
    settings = {
        "epochs": args.epochs,
        "recipe": RECIPE.name,
        "precision": "fp32",
        "warmup_share": WARMUP_SHARE,
        "subset_seed": SUBSET_SEED,
    }
    done, wall_before = [], 0.0
    if (args.resume or args.report) and json_path.is_file():
        saved = json.loads(json_path.read_text())
        if saved["settings"] != settings:
            sys.exit(f"{json_path} was written with other settings: {saved['settings']}")
        # Only the runs of this grid: `--seeds 2 --resume` reports a grid cut short in seed 3.
        grid = {(k, s, f, i) for k in KINDS for s in sizes for f in fractions for i in seeds}
        done = [r for r in saved["runs"] if key(r) in grid]
        wall_before = saved["wall_seconds"]
        print(f"{len(done)} runs of this grid already in {json_path}")
    if args.report and not done:
        sys.exit(f"no runs of this grid in {json_path}")

    command = " ".join(sys.argv)
    cpu = f"{cpu_name()}, {torch.get_num_threads()} torch thread(s)"
    if args.report:
        cpu = saved["cpu"]  # where the runs were made
    print(f"CPU: {cpu}")
    for name, m in models.items():
        print(f"  {name}: {m['params']:,} parameters, {m['flops'] / 1e6:.1f} MFLOPs/image")
    # The 28-pixel originals for the ViT, resized once to 32 pixels for the hybrid.
    image_sizes = {model_config(kind, sizes[0]).image_size for kind in KINDS}
    data = {
        px: (
            load_dataset("fashion-mnist", "train", image_size=px),
            load_dataset("fashion-mnist", "test", image_size=px),
        )
        for px in sorted(image_sizes)
        if not args.report
    }
    wall = time.perf_counter() - wall_before  # the earlier invocations' time, if resumed

    def write(runs: list[dict[str, Any]]) -> None:
        summary = summarise(runs, sizes, fractions)
        record = {
            "command": command,
            "cpu": cpu,
            "settings": settings,
            "models": models,
            "runs": runs,
            "summary": summary,
            "wall_seconds": time.perf_counter() - wall,
        }
        json_path.write_text(json.dumps(record, indent=1) + "\n")

    runs_so_far = list(done)

    def on_run(run: dict[str, Any]) -> None:
        runs_so_far.append(run)
        write(runs_so_far)
        print(
            f"seed {run['seed']} {run['kind']:>6}/{run['size']} {run['fraction']:>4.0%} "
            f"({run['train_images']:,} images, {run['steps']} steps): "
            f"{run['test_acc']:.2%} in {run['seconds']:.0f} s "
            f"[{(time.perf_counter() - wall) / 60:.1f} min]",
            flush=True,
        )

    if args.report:  # the file keeps every run; the tables are of this grid's
        runs = done
    else:
        try:
            runs = run_grid(data, sizes, fractions, seeds, args.epochs, done, on_run)
        except KeyboardInterrupt:
            sys.exit(f"\nstopped: {json_path} holds the finished runs; --resume carries on")
        write(runs)
    summary = summarise(runs, sizes, fractions)
    print_tables(summary, models, fractions)
    print_answer(summary, fractions)
    plot(summary, fractions, plot_path)
    minutes = (time.perf_counter() - wall) / 60
    print(f"\n{len(runs)} runs, {args.epochs} epochs each; {minutes:.1f} min on {cpu}")
    print(f"wrote {plot_path}" if args.report else f"wrote {json_path} and {plot_path}")


if __name__ == "__main__":
    main()
