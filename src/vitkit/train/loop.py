"""The training loop: in-memory or streamed data, batched augmentation, AdamW (or Muon and
AdamW), warmup + cosine, EMA, per-epoch validation and one test evaluation at the end,
checkpoints every few minutes and exact resume, on one process or many (torchrun). Ctrl-C and
SIGTERM finish the step, save and stop; a kill loses at most the time since the last save.

Every step draws its randomness (batch order, augmentation, dropout) from generators seeded by
(seed, epoch, step), so a run resumed from any step retraces the uninterrupted one exactly. With
several processes, each trains on its slice of the same global batch. In memory, every process
augments the whole batch and keeps its slice, so the run follows the same course whatever their
number (to rounding, and to dropout masks, drawn per micro-batch); streamed, each process reads
and augments only its slice (disjoint parts of every epoch), so the course is fixed for a given
number of processes.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import vitkit.train.checkpoint as checkpoint
import vitkit.train.distributed as distributed
from vitkit.data import ImageDataset, ImageStream
from vitkit.data.sources import source_kind
from vitkit.data.transforms import TrainTransform
from vitkit.evaluate import evaluate
from vitkit.model.vit import ViT
from vitkit.plots import plot_curves
from vitkit.rundir import BEST_DIR, METRICS_FILE, SKIPPED_FILE, TRAIN_CONFIG_FILE
from vitkit.runtime import auto_bf16, release_freed_memory, reuse_freed_memory
from vitkit.train.checkpoint import SavedState
from vitkit.train.config import TrainConfig
from vitkit.train.distill import distillation_loss, load_teacher, teacher_logits
from vitkit.train.distributed import World
from vitkit.train.optim import build_optimizers, lr_factor
from vitkit.train.setup import Data, model_and_data, read_saved, use_bf16
from vitkit.weights import CheckpointError, atomic_write, save_model

__all__ = ["TrainResult", "train"]

# A line an epoch of some 300 bytes: a real log is far smaller.
MAX_METRICS_BYTES = 64 * 2**20
# Called after each step with the number of steps done (see `train`).
StepHook = Callable[[int], None]
# Which signal has asked the run to stop, if any (see `_stop_on_signals`).
StopSignal = Callable[[], int | None]


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
    # From `train`'s call to the end of this call's first step (loading, set-up, first batch).
    first_step_seconds: float | None = None
    # The test split's accuracy, evaluated once at the last step (with `holdout` only).
    test_acc: float | None = None


@dataclass
class Run:
    """A run in progress: what it trains and with what, its schedule, and how far it has come.

    Sharded, `model` holds this process's shards and `plain` is rank 0's whole copy, to evaluate
    and save; otherwise both are the one model. `net` is what forward and backward run through
    (DDP, FSDP, compiled or the model itself), `parts` this process's micro-batches of a batch.
    """

    cfg: TrainConfig
    run_dir: Path
    world: World
    progress: bool
    model: ViT
    plain: ViT
    net: nn.Module
    optimizers: list[torch.optim.Optimizer]  # AdamW, or AdamW and Muon
    ema: list[torch.Tensor] | None
    teacher: ViT | None  # distillation's
    autocast: torch.autocast
    parts: list[tuple[int, slice, float]]
    # The data: training images and labels on the device (images None when streamed, read
    # by `stream` instead), their augmentation, validation data, and the test split that is
    # evaluated once at the end (with `holdout`; otherwise it validates, as `val_ds`).
    images: torch.Tensor | None
    labels: torch.Tensor
    stream: ImageStream | None
    transform: TrainTransform
    val_ds: ImageDataset | ImageStream
    test_ds: ImageDataset | ImageStream | None
    # The schedule, in steps.
    steps_per_epoch: int
    total: int
    warmup: int
    stop_after: int
    # How far it has come.
    step: int = 0
    best: float | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # (images, correct predictions, summed loss) of the epoch so far
    sums: tuple[int, int, float] = (0, 0, 0.0)
    lr: float = 0.0  # the last step's
    start: float = 0.0
    last_save: float = 0.0
    called: float = 0.0  # when `train` was called
    first_step: float | None = None  # seconds from then to the end of the first step
    # For images/s: what this process has trained on of the current epoch, since when, and
    # how long of it the steps waited for their data.
    seen: int = 0
    epoch_start: float = 0.0
    data_wait: float = 0.0


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    datasets: tuple[Data, Data] | None = None,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train a ViT as `cfg` says, writing everything into `run_dir` (itself a model dir).

    `datasets` (train, held-out) replaces loading `cfg.data`, e.g. for data already in memory;
    with `cfg.holdout`, validation is held out of its training part and its held-out part is
    the test split.
    Under torchrun every process calls this and trains on its part of each batch; rank 0
    alone evaluates, logs and writes the model, and all return the same result. `on_step`,
    if given, is called in every process after each step with the number of steps done.
    """
    run_dir = Path(run_dir)
    main = distributed.rank() == 0
    if main:
        checkpoint.clean(run_dir)
    states = checkpoint.find_states(run_dir, warn=main) if resume else []
    if states:
        # The run's own settings hold, except how far to go this time.
        max_steps = cfg.max_steps
        cfg = read_saved(
            states[0], "train_config", lambda d: TrainConfig.from_dict(d | {"max_steps": max_steps})
        )
    called = time.perf_counter()
    reuse_freed_memory()
    with distributed.joined(distributed.pick_device(device), cfg.shard) as world:
        run = _start(cfg, run_dir, states, world, datasets, progress and world.main)
        run.called = called
        return _train(run, on_step)


def _start(
    cfg: TrainConfig,
    run_dir: Path,
    states: list[SavedState],
    world: World,
    datasets: tuple[Data, Data] | None,
    progress: bool,
) -> Run:
    """The run set up: resumed from the newest of `states` that loads, or new; rank 0 writes
    its settings and log."""
    dev = world.device
    model, train_ds, val_ds, test_ds = model_and_data(cfg, states[0] if states else None, datasets)
    if progress:
        _say_what_validates(cfg, val_ds)
    if not states and str(cfg.init).startswith(("hf:", "timm:")):
        # A Hub name pinned to the commit it resolved to, so that train.json reproduces it.
        cfg = dataclasses.replace(cfg, init=model.config.source or cfg.init)
    model.to(dev)
    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} exceeds the {len(train_ds)} training images")
    total = cfg.epochs * steps_per_epoch
    fused = not cfg.shard and dev.type in ("cpu", "cuda")
    stream = train_ds if isinstance(train_ds, ImageStream) else None
    parts = world.micro_batches(cfg.batch_size, cfg.grad_accum)
    augment = cfg.augment
    if stream is not None:
        # Each process reads only its slice of a batch: its micro-batches index into that.
        first = parts[0][1].start
        parts = [(j, slice(s.start - first, s.stop - first), w) for j, s, w in parts]
        # The stream crops each image from its file, flips it and applies RandAugment (see
        # `ImageStream.augment`); the batch transforms do the rest.
        done = {"random_resized_crop": False}
        if stream.augment:
            done |= {"hflip": False, "randaugment_ops": 0}
        augment = dataclasses.replace(augment, **done)
    teacher = load_teacher(cfg.teacher, model, dev) if cfg.teacher else None
    model.distilling = teacher is not None
    run = Run(
        cfg=cfg,
        run_dir=run_dir,
        world=world,
        progress=progress,
        model=model,
        # Sharded, the model is nowhere whole: rank 0 keeps a plain copy to evaluate and save.
        plain=copy.deepcopy(model) if cfg.shard and world.main else model,
        net=distributed.wrap(model, world, cfg.shard),
        optimizers=build_optimizers(
            model,
            cfg.lr,
            cfg.weight_decay,
            cfg.layer_decay,
            fused,
            muon=cfg.optimizer == "muon",
            muon_kernels=cfg.muon_kernels,
            muon_precision="bf16" if auto_bf16(dev) else "fp32",
        ),
        ema=[p.detach().clone() for p in model.parameters()] if cfg.ema_decay > 0 else None,
        teacher=teacher,
        autocast=torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16(cfg, dev)),
        parts=parts,
        images=train_ds.images.to(dev) if stream is None else None,
        labels=train_ds.labels.to(dev),
        stream=stream,
        transform=TrainTransform(
            augment, model.config.mean, model.config.std, len(train_ds.classes)
        ),
        val_ds=val_ds,
        test_ds=test_ds,
        steps_per_epoch=steps_per_epoch,
        total=total,
        warmup=max(1, round(cfg.warmup_epochs * steps_per_epoch)),
        stop_after=min(total, cfg.max_steps) if cfg.max_steps is not None else total,
    )
    if states:
        _resume(run, states)
    if world.main:
        _write_settings(run)
    if cfg.compile:
        if world.size > 1:
            raise ValueError("compile is for single-process training")
        run.net = torch.compile(run.net)
    run.start = run.last_save = time.perf_counter()
    return run


def _say_what_validates(cfg: TrainConfig, val_ds: Data) -> None:
    """Which images the per-epoch validation (and the choice of best/) looks at."""
    if cfg.holdout:
        print(
            f"validation: {cfg.holdout:,} training images held out (seed fixed); "
            "test split evaluated once at the end"
        )
    elif source_kind(cfg.data) is None:
        print(
            f"validation: the test split ({len(val_ds):,} images); --holdout N validates on "
            "N training images instead"
        )


def _resume(run: Run, states: list[SavedState]) -> None:
    """Carry on from the newest state that loads: weights, optimiser, EMA, progress and log."""
    state = _restore(states, run.model, run.optimizers, run.ema, run.world.main)
    run.world.check_same(state.step, "the step to resume from")
    run.step, run.best = state.step, state.meta["best_val_acc"]
    run.history = [m for m in _read_metrics(run.run_dir) if m["step"] <= run.step]
    if run.step % run.steps_per_epoch:  # mid-epoch: the epoch's running figures go on
        run.sums = read_saved(state, "epoch_sums", _epoch_sums)


def _write_settings(run: Run) -> None:
    """train.json and the log so far, into a run directory made if new."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    # Rewritten on resume too: `max_steps` is the only setting a resumed run takes anew.
    settings = json.dumps(run.cfg.to_dict(), indent=2) + "\n"
    atomic_write(run.run_dir / TRAIN_CONFIG_FILE, settings)
    _write_metrics(run.run_dir, run.history)


def _train(run: Run, on_step: StepHook | None) -> TrainResult:
    """Epoch after epoch, each ending with a save, until the run is done or a signal stops it."""
    with _stop_on_signals() as stop_signal:
        stop = False  # Ctrl-C or SIGTERM in any process, once all of them have heard of it
        while run.step < run.stop_after and not stop:
            stop = _epoch(run, stop_signal, on_step)
            _save(run)
        received = stop_signal() if stop else None
    if stop and run.progress:
        print(f"interrupted at step {run.step}; resume with: vitkit train --resume {run.run_dir}")
    if stop and received is None:
        received = signal.SIGINT  # another process was stopped
    seconds = time.perf_counter() - run.start
    return TrainResult(
        run.run_dir,
        run.step,
        run.total,
        run.val_acc,
        run.best,
        seconds,
        stop,
        received,
        run.first_step,
        run.test_acc,
    )


def _epoch(run: Run, stop_signal: StopSignal, on_step: StepHook | None) -> bool:
    """Train from the current step to the epoch's end (or the run's, or a stop), evaluating if
    either end is reached; returns whether a signal stopped the run."""
    cfg, per_epoch = run.cfg, run.steps_per_epoch
    epoch = run.step // per_epoch
    perm = torch.randperm(len(run.labels), generator=_gen(cfg.seed, epoch, -1))
    perm = perm.to(run.world.device)
    batches = _batches(run, epoch, perm)
    bar = tqdm(
        total=per_epoch,
        initial=run.step % per_epoch,
        disable=not run.progress,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="step",
        dynamic_ncols=True,
    )
    if run.step % per_epoch == 0:  # a new epoch (not one resumed midway): its figures start at 0
        run.sums = (0, 0, 0.0)
    run.seen, run.epoch_start, run.data_wait = 0, time.perf_counter(), 0.0
    run.net.train()
    stop = False
    while run.step < run.stop_after and run.step // per_epoch == epoch and not stop:
        waited = time.perf_counter()
        images, labels = next(batches)
        run.data_wait += time.perf_counter() - waited
        stop = _step(run, images, labels, stop_signal)
        if run.first_step is None:
            run.first_step = time.perf_counter() - run.called
        seen, correct, loss = run.sums
        elapsed = time.perf_counter() - run.epoch_start
        bar.update()
        bar.set_postfix(
            loss=f"{loss / seen:.3f}",
            acc=f"{correct / seen:.3f}",
            lr=f"{run.lr:.2e}",
            img_s=f"{run.seen / elapsed:.0f}",
            data=f"{run.data_wait / elapsed:.0%}",
        )
        if on_step is not None:
            on_step(run.step)
    bar.close()
    batches.close()  # a stream's worker processes end with it
    if run.step % per_epoch == 0 or run.step == run.stop_after:
        _end_epoch(run)
    return stop


def _batches(
    run: Run, epoch: int, perm: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (uint8 images, labels) of each step of the epoch from the run's current one: in
    memory, the whole global batch; streamed, only this process's slice of it."""
    size, per_epoch = run.cfg.batch_size, run.steps_per_epoch
    start = run.step % per_epoch
    if run.stream is None:
        assert run.images is not None
        for i in range(start, per_epoch):
            idx = perm[i * size : (i + 1) * size]
            yield run.images[idx], run.labels[idx]
        return
    parts = run.world.micro_batches(size, run.cfg.grad_accum)
    first, last = parts[0][1].start, parts[-1][1].stop
    mine = perm.view(-1)[: per_epoch * size].cpu().view(per_epoch, size)[:, first:last]
    device = run.world.device
    for images, labels in run.stream.batches(epoch, mine.reshape(-1).tolist(), last - first, start):
        yield images.to(device), labels.to(device)


def _step(run: Run, images: torch.Tensor, labels: torch.Tensor, stop_signal: StopSignal) -> bool:
    """One step of the loop: the batch's random draws, the update, the figures summed over
    the processes, a save if one is due. Returns whether a signal stops the run."""
    cfg = run.cfg
    epoch, i = divmod(run.step, run.steps_per_epoch)
    gen = _gen(cfg.seed, epoch, i)
    dropout_seed = int(torch.randint(2**62, (1,), generator=gen))
    if run.stream is not None and run.world.size > 1:  # each process's slice draws its own
        gen = _gen(cfg.seed, epoch, i * run.world.size + run.world.rank + 2**40)
    # In memory, every process augments the whole global batch and keeps its part: the random
    # draws (and mixup's pairs) are then the same for any number of processes.
    x, targets = run.transform(images, labels, gen)
    size = input_size(cfg, run.model.config.token_stride, x.shape[-1], epoch)
    if size < x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    run.lr = cfg.lr * lr_factor(run.step, run.total, run.warmup, cfg.min_lr_factor)
    losses, hits = _update(run, x, targets, dropout_seed)
    run.step += 1
    # Rank 0's clock decides when to save, so that all processes save together.
    due = run.world.main and time.perf_counter() - run.last_save >= cfg.save_every * 60
    losses, hits, stops, saves = run.world.sum(
        [losses, hits, float(stop_signal() is not None), float(due)]
    )
    stop = stops > 0
    sums = run.sums
    run.sums = (sums[0] + cfg.batch_size, sums[1] + int(hits), sums[2] + losses)
    run.seen += cfg.batch_size
    if saves and not stop and run.step % run.steps_per_epoch and run.step < run.stop_after:
        _save(run)  # mid-epoch; the epoch's end and a stop save in `_train`
    return stop


def input_size(cfg: TrainConfig, stride: int, full: int, epoch: int) -> int:
    """The side of epoch `epoch`'s inputs under progressive resizing: from
    `cfg.progressive_size` up to `full` in equal steps over the first `progressive_until` of
    the epochs, rounded down to whole tokens (`stride` pixels a token), then `full`."""
    ramp = cfg.progressive_until * cfg.epochs
    if cfg.progressive_size is None or epoch >= ramp:
        return full
    size = cfg.progressive_size + (full - cfg.progressive_size) * epoch / ramp
    return min(full, max(stride, int(size) // stride * stride))


def _update(
    run: Run, x: torch.Tensor, targets: torch.Tensor, dropout_seed: int
) -> tuple[float, int]:
    """One optimisation step at `run.lr`, on this process's micro-batches of the global batch
    (x, targets); returns their summed loss and their number of correct predictions."""
    cfg = run.cfg
    for optimizer in run.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = run.lr * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
    hard = targets if targets.ndim == 1 else targets.argmax(-1)
    taught, first = None, run.parts[0][1].start
    if run.teacher is not None:  # on this process's part of the batch only
        with run.autocast:
            taught = teacher_logits(run.teacher, run.model, x[first : run.parts[-1][1].stop])
    loss_sum, correct = 0.0, 0
    for k, (j, part, weight) in enumerate(run.parts):
        torch.manual_seed(dropout_seed + j)  # dropout, stochastic depth
        with distributed.grad_sync(run.net, sync=k == len(run.parts) - 1):
            with run.autocast:
                logits = run.net(x[part])
            if taught is not None:  # [CLS] learns the labels, the distillation token the teacher
                logits, dist = logits
                loss = 0.5 * F.cross_entropy(
                    logits.float(), targets[part], label_smoothing=cfg.label_smoothing
                ) + 0.5 * distillation_loss(
                    dist,
                    taught[part.start - first : part.stop - first],
                    cfg.distill,
                    cfg.distill_temperature,
                )
                logits = (logits + dist) / 2  # what the model answers
            else:
                loss = F.cross_entropy(
                    logits.float(), targets[part], label_smoothing=cfg.label_smoothing
                )
            (loss * weight).backward()
        loss_sum += loss.item() * len(logits)
        correct += int((logits.argmax(-1) == hard[part]).sum())
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    for optimizer in run.optimizers:
        optimizer.step()
    if run.ema is not None:
        params = distributed.local(run.model.parameters())
        torch._foreach_lerp_(distributed.local(run.ema), params, 1.0 - cfg.ema_decay)
    return loss_sum, correct


def _end_epoch(run: Run) -> None:
    """Rank 0 validates (the EMA weights if kept), logs, and saves the model and the best one
    so far; at the run's last step it evaluates the test split too, once, on the weights it
    saves (never to choose). Every process learns the accuracies."""
    model, ema = _whole(run)
    if run.world.main:
        images, correct, loss = run.sums
        metrics = {
            "epoch": run.step / run.steps_per_epoch,
            "step": run.step,
            "lr": run.lr,
            "train_loss": loss / max(images, 1),
            "train_acc": correct / max(images, 1),
            "images_per_second": run.seen / (time.perf_counter() - run.epoch_start),
            # The share of the epoch's time spent waiting for batches (decoding, if streamed).
            "data_wait": run.data_wait / (time.perf_counter() - run.epoch_start),
            "elapsed_s": time.perf_counter() - run.start,
        }
        if run.cfg.progressive_size is not None:  # the size of the epoch's last step
            epoch = (run.step - 1) // run.steps_per_epoch
            full = run.model.config.image_size
            metrics["image_size"] = input_size(run.cfg, run.model.config.token_stride, full, epoch)
        if run.stream is not None and run.stream.skipped:
            _report_skipped(run.run_dir, run.stream.skipped, run.progress)
        with _weights(model, ema):
            release_freed_memory()  # the steps' activations, kept for the next step
            with run.autocast:
                report = evaluate(model, run.val_ds, progress=False)
                test = None
                if run.test_ds is not None and run.step == run.stop_after:
                    test = evaluate(model, run.test_ds, progress=False)
            save_model(model, run.run_dir)
            if run.best is None or report.top1 > run.best:
                run.best = report.top1
                save_model(model, run.run_dir / BEST_DIR)
        run.val_acc = report.top1
        metrics |= {
            "val_loss": report.loss,
            "val_acc": report.top1,
            "val_images": report.num_images,
        }
        if test is not None:
            run.test_acc = test.top1
            metrics |= {
                "test_loss": test.loss,
                "test_acc": test.top1,
                "test_images": test.num_images,
            }
        _log(run, metrics)
    run.val_acc, run.best, run.test_acc = run.world.broadcast((run.val_acc, run.best, run.test_acc))


def _report_skipped(run_dir: Path, skipped: dict[str, None], progress: bool) -> None:
    """The unreadable files a stream passed over so far, into the run directory (one line
    each: path and reason) and, with progress shown, a line on the console."""
    atomic_write(run_dir / SKIPPED_FILE, "".join(f"{line}\n" for line in skipped))
    if progress:
        print(f"  {len(skipped)} unreadable image file(s) skipped: see {run_dir / SKIPPED_FILE}")


def _whole(run: Run) -> tuple[ViT, list[torch.Tensor] | None]:
    """The model that rank 0 evaluates and saves, and the EMA weights to swap into it. Sharded,
    every process helps gather the weights (the EMA's, if kept) into rank 0's plain copy."""
    if not run.cfg.shard:
        return run.model, run.ema
    with _weights(run.model, run.ema):
        weights = distributed.full_state_dict(run.model)
        if run.world.main:  # copied now: with one process on the CPU, the tensors are the model's
            run.plain.load_state_dict(weights)
    return run.plain, None


def _log(run: Run, metrics: dict[str, Any]) -> None:
    """An epoch's figures into the run's log, its curves and (with progress shown) the console."""
    run.history.append(metrics)
    _write_metrics(run.run_dir, run.history)
    # Curves are redrawn about 20 times a run (and at its end): plotting costs about a second,
    # which adds up over hundreds of short epochs.
    epoch = run.step // run.steps_per_epoch
    if run.step == run.stop_after or epoch % max(1, run.cfg.epochs // 20) == 0:
        plot_curves(run.run_dir / METRICS_FILE, run.run_dir)
    if run.progress:
        acc, loss = metrics["val_acc"], metrics["val_loss"]
        print(f"  val acc {acc:.4f}  val loss {loss:.4f}  (best {run.best:.4f})")
        if "test_acc" in metrics:
            print(f"  test acc (final weights, evaluated once) {metrics['test_acc']:.4f}")


def _save(run: Run) -> None:
    """The run's state at its current step, for a resume; every process takes part."""
    meta = {
        "step": run.step,
        "best_val_acc": run.best,
        "epoch_sums": list(run.sums),
        "train_config": run.cfg.to_dict(),
        "model_config": run.model.config.to_dict(),
    }
    sharded, main = run.cfg.shard, run.world.main
    checkpoint.save(run.run_dir, run.model, run.optimizers, run.ema, meta, sharded, main)
    run.last_save = time.perf_counter()


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
def _stop_on_signals() -> Iterator[StopSignal]:
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
    optimizers: list[torch.optim.Optimizer],
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
            checkpoint.restore(model, optimizers, ema, state)
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
