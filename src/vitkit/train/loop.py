"""The training loop: in-memory data, batched augmentation, AdamW, warmup + cosine, EMA,
per-epoch evaluation, checkpoints every few minutes and exact resume, on one process or many
(torchrun). Ctrl-C and SIGTERM finish the step, save and stop; a kill loses at most the time
since the last save.

Every step draws its randomness (batch order, augmentation, dropout) from generators seeded by
(seed, epoch, step), so a run resumed from any step retraces the uninterrupted one exactly. With
several processes, each trains on its slice of the same global batch, so the run follows the
same course whatever their number (to rounding, and to dropout masks, drawn per micro-batch).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vitkit.config import ViTConfig, get_preset
from vitkit.data import ImageDataset, dataset_stats, load_dataset
from vitkit.data.transforms import TrainTransform
from vitkit.infer.evaluate import evaluate
from vitkit.infer.optimize import calibration_sample, fast_precisions
from vitkit.model.factory import create_model
from vitkit.model.vit import ViT
from vitkit.plots import plot_curves
from vitkit.runtime import reuse_freed_memory
from vitkit.train import checkpoint, distributed
from vitkit.train.checkpoint import SavedState
from vitkit.train.config import TrainConfig
from vitkit.train.distributed import World
from vitkit.train.optim import build_optimizer, lr_factor
from vitkit.weights import CheckpointError, atomic_write, load_pretrained, save_model

METRICS_FILE = "metrics.jsonl"
# A line an epoch of some 300 bytes: a real log is far smaller.
MAX_METRICS_BYTES = 64 * 2**20
TRAIN_CONFIG_FILE = "train.json"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    val_acc: float | None
    best_val_acc: float | None
    seconds: float
    interrupted: bool = False
    # The signal that stopped the run early (SIGINT or SIGTERM), if one did.
    stop_signal: int | None = None


# -- choices ---------------------------------------------------------------------------
# Image folders are decoded to this size unless a preset or recipe says otherwise.
FOLDER_IMAGE_SIZE = 64


def default_preset(image_size: int) -> str:
    """A small-image preset suited to the data's size (recipes name their own)."""
    return {28: "Ti/4@28", 32: "Ti/4@32"}.get(image_size, "Ti/4@28")


def model_config(cfg: TrainConfig, train: ImageDataset) -> ViTConfig:
    """Preset + recipe overrides, fitted to the data: size, channels, classes, normalisation."""
    base = get_preset(cfg.model or default_preset(train.image_size))
    mean, std = dataset_stats(train)
    std = tuple(s if s > 1e-6 else 1.0 for s in std)  # a constant channel: centre it only
    fitted: dict[str, Any] = {
        "image_size": train.image_size,
        "in_channels": train.channels,
        "num_classes": len(train.classes),
        "mean": mean,
        "std": std,
    }
    if cfg.model is None and train.image_size not in (28, 32):
        fitted["patch_size"] = max(1, train.image_size // 8)  # an 8x8 grid of patches
    return base.replace(**(fitted | cfg.model_overrides))


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    return auto_bf16(device)


def auto_bf16(device: torch.device) -> bool:
    """bf16 autocast wherever the hardware has fast bf16: measured on a 2-core AVX-512-bf16
    CPU, steps are 1.7x faster at width 96 and 2.5x at width 192 (attention as plain bf16
    matmuls, see `explicit_attention`), and the long Fashion-MNIST recipe learns as in fp32."""
    return "bf16" in fast_precisions(device)


def load_splits(
    cfg: TrainConfig, image_size: int | None, channels: int | None = None
) -> tuple[ImageDataset, ImageDataset]:
    """Training data and held-out data: the dataset's test split, or a folder's validation part."""
    kwargs = {"data_dir": cfg.data_dir, "image_size": image_size, "channels": channels}
    if cfg.data in ("fashion-mnist", "mnist", "digits"):
        return load_dataset(cfg.data, "train", **kwargs), load_dataset(cfg.data, "test", **kwargs)
    kwargs["val_fraction"] = cfg.val_fraction
    return load_dataset(cfg.data, "train", **kwargs), load_dataset(cfg.data, "val", **kwargs)


def _setup(
    cfg: TrainConfig,
    state: SavedState | None,
    datasets: tuple[ImageDataset, ImageDataset] | None,
) -> tuple[ViT, ImageDataset, ImageDataset]:
    """The model to train and its data: resumed from `state`, fine-tuned from `cfg.init`, or
    new from a preset fitted to the data."""
    pretrained = load_pretrained(cfg.init) if cfg.init and state is None else None
    if state is not None:
        config = _saved(state, "model_config", ViTConfig.from_dict)
    else:
        config = pretrained.config if pretrained is not None else None
    size = cfg.model_overrides.get("image_size", config.image_size if config else None)
    if state is not None:
        size = config.image_size
    elif size is None and cfg.model:
        size = get_preset(cfg.model).image_size
    elif size is None and Path(cfg.data).is_dir():
        size = FOLDER_IMAGE_SIZE
    # A new model's `in_channels` override converts the data (e.g. a folder to grey).
    channels = config.in_channels if config else cfg.model_overrides.get("in_channels")
    train_ds, val_ds = datasets or load_splits(cfg, size, channels)
    if pretrained is not None:
        model = _fit_pretrained(pretrained, cfg, train_ds)
    else:
        model = create_model(config or model_config(cfg, train_ds), seed=cfg.seed)
    model.labels = train_ds.classes
    model.calibration = calibration_sample(train_ds.images, cfg.seed)
    if cfg.linear_probe:  # train the head only
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    return model, train_ds, val_ds


# What a recipe's [model] may change in a pretrained model: regularisation, not weights.
FINETUNE_OVERRIDES = frozenset({"dropout", "attn_dropout", "drop_path"})


def _fit_pretrained(model: ViT, cfg: TrainConfig, train: ImageDataset) -> ViT:
    """A pretrained model with a head for the data's classes, at the data's resolution."""
    n = len(train.classes)
    if cfg.num_classes is not None:
        if cfg.num_classes != n:
            raise ValueError(f"--num-classes {cfg.num_classes}, but the data has {n} classes")
        model.reset_head(n)
    elif model.config.num_classes != n:
        raise ValueError(
            f"the pretrained head has {model.config.num_classes} classes and the "
            f"data {n}: pass --num-classes {n} for a new head"
        )
    model.set_image_size(train.image_size)  # position embeddings resampled if it differs
    overrides = {k: v for k, v in cfg.model_overrides.items() if k != "image_size"}
    fixed = sorted(set(overrides) - FINETUNE_OVERRIDES)
    if fixed:
        raise ValueError(
            f"a pretrained model's {', '.join(fixed)} cannot change when fine-tuning; "
            f"[model] may set {', '.join(sorted(FINETUNE_OVERRIDES | {'image_size'}))}"
        )
    if overrides:  # regularisation lives in the modules: rebuild them, keep every weight
        tuned = ViT(model.config.replace(**overrides))
        tuned.load_state_dict(model.state_dict())
        model = tuned
    return model


# -- the loop --------------------------------------------------------------------------
def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    datasets: tuple[ImageDataset, ImageDataset] | None = None,
) -> TrainResult:
    """Train a ViT as `cfg` says, writing everything into `run_dir` (itself a model dir).

    `datasets` (train, held-out) replaces loading `cfg.data`, e.g. for data already in memory.
    Under torchrun every process calls this and trains on its part of each batch; rank 0
    alone evaluates, logs and writes the model, and all return the same result.
    """
    run_dir = Path(run_dir)
    main = distributed.rank() == 0
    if main:
        checkpoint.clean(run_dir)
    states = checkpoint.find_states(run_dir, warn=main) if resume else []
    if states:
        # The run's own settings hold, except how far to go this time.
        max_steps = cfg.max_steps
        cfg = _saved(
            states[0], "train_config", lambda d: TrainConfig.from_dict(d | {"max_steps": max_steps})
        )
    reuse_freed_memory()
    with distributed.joined(distributed.pick_device(device), cfg.shard) as world:
        return _train(cfg, run_dir, states, world, progress and world.main, datasets)


def _saved(state: SavedState, key: str, parse: Callable[[dict[str, Any]], Any]) -> Any:
    """`parse` of settings a saved state holds, any error in them named by the file."""
    try:
        return parse(state.meta[key])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{state.path / checkpoint.STATE_JSON}: {key}: {e}") from None


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    states: list[SavedState],
    world: World,
    progress: bool,
    datasets: tuple[ImageDataset, ImageDataset] | None,
) -> TrainResult:
    dev = world.device
    model, train_ds, val_ds = _setup(cfg, states[0] if states else None, datasets)
    if not states and str(cfg.init).startswith(("hf:", "timm:")):
        # A Hub name pinned to the commit it resolved to, so that train.json reproduces it.
        cfg = dataclasses.replace(cfg, init=model.config.source or cfg.init)
    model.to(dev)
    config = model.config
    # Sharded, the model is nowhere whole: rank 0 keeps a plain copy to evaluate and save.
    plain = copy.deepcopy(model) if cfg.shard and world.main else model
    net = distributed.wrap(model, world, cfg.shard)  # what forward and backward run through
    fused = not cfg.shard and dev.type in ("cpu", "cuda")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.layer_decay, fused)
    ema = [p.detach().clone() for p in model.parameters()] if cfg.ema_decay > 0 else None

    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} exceeds the {len(train_ds)} training images")
    parts = world.micro_batches(cfg.batch_size, cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    step, best, history, sums = 0, None, [], (0, 0, 0.0)
    if states:
        state = _restore(states, model, optimizer, ema, world.main)
        world.check_same(state.step, "the step to resume from")
        step, best = state.step, state.meta["best_val_acc"]
        history = [m for m in _read_metrics(run_dir) if m["step"] <= step]
        if step % steps_per_epoch:  # mid-epoch: the epoch's running figures go on
            sums = _saved(state, "epoch_sums", _epoch_sums)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Rewritten on resume too: `max_steps` is the only setting a resumed run takes anew.
        atomic_write(run_dir / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
        _write_metrics(run_dir, history)

    bf16 = use_bf16(cfg, dev)
    if cfg.compile:
        if world.size > 1:
            raise ValueError("compile is for single-process training")
        net = torch.compile(net)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    transform = TrainTransform(cfg.augment, config.mean, config.std, len(train_ds.classes))
    images, labels = train_ds.images.to(dev), train_ds.labels.to(dev)
    stop_after = min(total, cfg.max_steps) if cfg.max_steps is not None else total
    val_acc = None
    start = last_save = time.perf_counter()

    def save() -> None:
        nonlocal last_save
        meta = {
            "step": step,
            "best_val_acc": best,
            "epoch_sums": list(sums),
            "train_config": cfg.to_dict(),
            "model_config": config.to_dict(),
        }
        checkpoint.save(run_dir, model, optimizer, ema, meta, cfg.shard, world.main)
        last_save = time.perf_counter()

    with _stop_on_signals() as stop_signal:
        stop = False  # Ctrl-C or SIGTERM in any process, once all of them have heard of it
        while step < stop_after and not stop:
            epoch = step // steps_per_epoch
            perm = torch.randperm(len(train_ds), generator=_gen(cfg.seed, epoch, -1)).to(dev)
            bar = tqdm(
                total=steps_per_epoch,
                initial=step % steps_per_epoch,
                disable=not progress,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="step",
                dynamic_ncols=True,
            )
            # (images, correct predictions, summed loss) of the epoch so far
            sums = sums if step % steps_per_epoch else (0, 0, 0.0)
            seen_here, t0 = 0, time.perf_counter()  # for images/s: this process's part only
            net.train()
            while step < stop_after and step // steps_per_epoch == epoch and not stop:
                i = step % steps_per_epoch
                idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                gen = _gen(cfg.seed, epoch, i)
                dropout_seed = int(torch.randint(2**62, (1,), generator=gen))
                # Every process augments the whole global batch and keeps its part: the random
                # draws (and mixup's pairs) are then the same for any number of processes.
                x, targets = transform(images[idx], labels[idx], gen)
                lr = cfg.lr * lr_factor(step, total, warmup, cfg.min_lr_factor)
                losses, hits = _step(
                    net, model, optimizer, ema, x, targets, lr, cfg, autocast, parts, dropout_seed
                )
                step += 1
                # Rank 0's clock decides when to save, so that all processes save together.
                due = world.main and time.perf_counter() - last_save >= cfg.save_every * 60
                losses, hits, stops, saves = world.sum(
                    [losses, hits, float(stop_signal() is not None), float(due)]
                )
                stop = stops > 0
                sums = (sums[0] + len(idx), sums[1] + int(hits), sums[2] + losses)
                seen_here += len(idx)
                bar.update()
                bar.set_postfix(
                    loss=f"{sums[2] / sums[0]:.3f}",
                    acc=f"{sums[1] / sums[0]:.3f}",
                    lr=f"{lr:.2e}",
                    img_s=f"{seen_here / (time.perf_counter() - t0):.0f}",
                )
                if saves and not stop and step % steps_per_epoch and step < stop_after:
                    save()  # mid-epoch; the epoch's end and a stop save below
            bar.close()
            if step % steps_per_epoch == 0 or step == stop_after:
                # Curves are redrawn about 20 times a run (and at its end): plotting costs
                # about a second, which adds up over hundreds of short epochs.
                plot = (
                    step == stop_after or (step // steps_per_epoch) % max(1, cfg.epochs // 20) == 0
                )
                whole, whole_ema = _whole(model, plain, ema, cfg.shard, world)
                if world.main:
                    val_acc, best = _end_epoch(
                        run_dir,
                        whole,
                        whole_ema,
                        val_ds,
                        autocast,
                        best,
                        history,
                        {
                            "epoch": step / steps_per_epoch,
                            "step": step,
                            "lr": lr,
                            "train_loss": sums[2] / max(sums[0], 1),
                            "train_acc": sums[1] / max(sums[0], 1),
                            "images_per_second": seen_here / (time.perf_counter() - t0),
                            "elapsed_s": time.perf_counter() - start,
                        },
                        progress,
                        plot,
                    )
                val_acc, best = world.broadcast((val_acc, best))
            save()
        received = stop_signal() if stop else None
        interrupted = stop
    if interrupted and progress:
        print(f"interrupted at step {step}; resume with: vitkit train --resume {run_dir}")
    if interrupted and received is None:
        received = signal.SIGINT  # another process was stopped
    return TrainResult(
        run_dir, step, total, val_acc, best, time.perf_counter() - start, interrupted, received
    )


def _step(
    net: nn.Module,
    model: ViT,
    optimizer: torch.optim.Optimizer,
    ema: list[torch.Tensor] | None,
    x: torch.Tensor,
    targets: torch.Tensor,
    lr: float,
    cfg: TrainConfig,
    autocast: torch.autocast,
    parts: list[tuple[int, slice, float]],
    dropout_seed: int,
) -> tuple[float, int]:
    """One optimisation step, on this process's micro-batches of the global batch (x, targets);
    returns their summed loss and their number of correct predictions."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    optimizer.zero_grad(set_to_none=True)
    hard = targets if targets.ndim == 1 else targets.argmax(-1)
    loss_sum, correct = 0.0, 0
    for k, (j, part, weight) in enumerate(parts):
        torch.manual_seed(dropout_seed + j)  # dropout, stochastic depth
        with distributed.grad_sync(net, sync=k == len(parts) - 1):
            with autocast:
                logits = net(x[part])
            loss = F.cross_entropy(
                logits.float(), targets[part], label_smoothing=cfg.label_smoothing
            )
            (loss * weight).backward()
        loss_sum += loss.item() * len(logits)
        correct += int((logits.argmax(-1) == hard[part]).sum())
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    if ema is not None:
        params = distributed.local(model.parameters())
        torch._foreach_lerp_(distributed.local(ema), params, 1.0 - cfg.ema_decay)
    return loss_sum, correct


def _whole(
    model: ViT, plain: ViT, ema: list[torch.Tensor] | None, sharded: bool, world: World
) -> tuple[ViT, list[torch.Tensor] | None]:
    """The model that rank 0 evaluates and saves, and the EMA weights to swap into it. Sharded,
    every process helps gather the weights (the EMA's, if kept) into rank 0's plain copy."""
    if not sharded:
        return model, ema
    with _weights(model, ema):
        weights = distributed.full_state_dict(model)
        if world.main:  # copied now: with one process on the CPU, the tensors are the model's
            plain.load_state_dict(weights)
    return plain, None


def _end_epoch(
    run_dir: Path,
    model: ViT,
    ema: list[torch.Tensor] | None,
    val_ds: ImageDataset,
    autocast: torch.autocast,
    best: float | None,
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    progress: bool,
    plot: bool,
) -> tuple[float, float]:
    """Evaluate (the EMA weights if kept), log into `history`, save the model and the best one
    so far."""
    with _weights(model, ema):
        with autocast:
            report = evaluate(model, val_ds, progress=False)
        metrics |= {"val_loss": report.loss, "val_acc": report.top1}
        save_model(model, run_dir)
        if best is None or report.top1 > best:
            best = report.top1
            save_model(model, run_dir / "best")
    history.append(metrics)
    _write_metrics(run_dir, history)
    if plot:
        plot_curves(run_dir / METRICS_FILE, run_dir)
    if progress:
        print(f"  val acc {report.top1:.4f}  val loss {report.loss:.4f}  (best {best:.4f})")
    return report.top1, best


@contextlib.contextmanager
def _weights(model: ViT, ema: list[torch.Tensor] | None) -> Iterator[None]:
    """Temporarily swap the EMA weights into the model (no-op without EMA)."""
    model.eval()
    if ema is None:
        yield
        return
    params = distributed.local(model.parameters())
    live = [p.clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_(params, distributed.local(ema))
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, live)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[Callable[[], int | None]]:
    """Ctrl-C (SIGINT) or SIGTERM (`docker stop`, a cluster taking the machine back) finishes
    the current step, then the loop saves its state and stops; yields which signal came."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if received:  # a second signal: the user really means it
            raise KeyboardInterrupt
        received.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not in the main thread: no handler, no graceful stop.
        with contextlib.suppress(ValueError):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield lambda: received[0] if received else None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _gen(seed: int, epoch: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) % 2**63)


def _restore(
    states: list[SavedState],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: list[torch.Tensor] | None,
    main: bool,
) -> SavedState:
    """Load the newest state that loads, falling back (with a message) to the one before it
    when the newest is unreadable; states of other settings are never mixed in."""
    errors = []
    for state in states:
        if any(state.meta[k] != states[0].meta[k] for k in ("model_config", "train_config")):
            errors.append(f"{state.path}: saved with other settings than {states[0].path}")
            continue
        try:
            checkpoint.restore(model, optimizer, ema, state)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors and main:
            print(f"warning: resume: {errors[-1]}; resuming from {state.path}", file=sys.stderr)
        return state
    raise CheckpointError("; ".join(errors))


def _epoch_sums(value: Any) -> tuple[int, int, float]:
    """(images, correct, summed loss) of a saved epoch in progress."""
    ok = isinstance(value, list) and len(value) == 3
    if not ok or not all(isinstance(v, int | float) and math.isfinite(v) for v in value):
        raise ValueError(f"expected [images, correct, loss], got {str(value)[:100]}")
    return int(value[0]), int(value[1]), float(value[2])


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, rewritten whole each time so that a kill never tears a line."""
    atomic_write(run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in history))


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The logged epochs of a run; lines that are not such a record (torn by an older version's
    kill, or edited) are skipped with a warning, since a log must never block a resume."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    if path.stat().st_size > MAX_METRICS_BYTES:
        print(f"warning: {path}: too large for this run's log; starting anew", file=sys.stderr)
        return []
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            bad += line.strip() != ""
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad += 1
    if bad:
        print(f"warning: {path}: skipped {bad} unreadable line(s)", file=sys.stderr)
    return records
