"""vitkit's streamed training loader against timm's, in one process: images per second up to a
normalised float batch ready for the model, from ImageNet-like JPEGs, at 224 px with the usual
training augmentation.

    python bench/loader_speed.py --images 2000 --workers 2 --batch 64 --epochs 3

vitkit: `ImageStream` cuts a random resized crop (scale 0.08-1, ratio 3/4-4/3, bicubic) from
each full-resolution file in its worker processes, flips it and applies RandAugment (2 ops at
magnitude 9) to the 8-bit image there (`SampleAugment`), then the main process runs
`TrainTransform` for what is left (to float, ImageNet normalisation), as `vitkit train` feeds
a streamed run. timm: `timm.data.create_loader` over `ImageDataset` with
the same crop and filter, flip 0.5, `rand-m9-n2-p1.0` and the same normalisation, everything per
image in its workers (`use_prefetcher=False`: ToTensor and Normalize in the workers), and also
with its prefetcher on the CPU (`use_prefetcher=True, device=cpu`: uint8 from the workers,
normalised batched in the main process). All use the same number of worker processes.

The photos (500x375 JPEGs by default, in 10 class folders: smooth colour fields, shapes with
sharp edges and grain, so that decoding costs what a photo's does) are written once into
--root and kept. Passes, one epoch over the photos each, alternate between the loaders in an
order that turns every round, so that a machine shared with other work slows them alike. For
each loader it reports:

- warm-up: the wait for the first batch of its first pass (workers started), and of later
  passes (vitkit starts its workers every epoch; timm keeps them);
- steady throughput: from the `workers`-th batch of a pass to its last (the first `workers`
  batches are made side by side as the workers start, so counting from the first batch would
  credit the pass with work done during the warm-up);
- epoch throughput: every image of the later passes over their whole time, warm-up included;
- CPU time per image of the main process and of the workers (from /proc): steadier than wall
  time on a shared machine, and what bounds throughput once every core is busy.

The main process keeps torch's default thread count, as `vitkit train` does; --threads 1 shows
what its batched transform costs when it does not compete with the workers for the cores.
Then where vitkit's time goes, timed in this process: its workers' work per image (decode and
crop) beside a plain full-size decode, and its main-process transform per batch step by step;
beside them timm's per-image steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw, ImageFilter, features

from vitkit.benchmark import import_timm
from vitkit.data.preprocess import load_image, normalize, to_float
from vitkit.data.sample_augment import SampleAugment
from vitkit.data.stream import FolderSource, ImageStream, RandomResizedCrop, default_workers
from vitkit.data.transforms import (
    RANDAUGMENT_OPS,
    AugmentConfig,
    TrainTransform,
    rand_augment,
    random_hflip,
)
from vitkit.runtime import cpu_name, reuse_freed_memory

SIZE = 224
CLASSES = 10
MEAN = (0.485, 0.456, 0.406)  # ImageNet's, as timm's defaults
STD = (0.229, 0.224, 0.225)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
# The same augmentation on both sides: RandAugment as its paper defines it, 2 ops each always
# applied at magnitude 9 (timm's `p1.0`; its default applies each op with probability 0.5,
# half the work; vitkit's 13 ops include the identity, timm's 15 do not).
RANDAUGMENT = "rand-m9-n2-p1.0"
AUGMENT = AugmentConfig(
    random_resized_crop=False,  # the stream crops from the file
    crop_scale=SCALE,
    crop_ratio=RATIO,
    hflip=True,
    randaugment_ops=2,
    randaugment_magnitude=9.0,
)
# What the stream's workers do per image, and what is left for the batch in the main process.
STREAM_AUGMENT = SampleAugment(hflip=True, randaugment_ops=2, randaugment_magnitude=9.0)
MAIN_AUGMENT = dataclasses.replace(AUGMENT, hflip=False, randaugment_ops=0)
LOADERS = ("vitkit", "timm", "timm-prefetcher")


# -- the photos -------------------------------------------------------------------------------
def _photo(seed: int, width: int, height: int) -> np.ndarray:
    """A photo-like RGB picture: a smooth colour field, a dozen shapes with sharp edges,
    slightly blurred, and film grain."""
    rng = np.random.default_rng(seed)
    cells = rng.uniform(40, 215, (3, 4, 3)).astype(np.uint8)
    img = Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.uniform(-0.1, 1, 2) * (width, height)
        w, h = rng.uniform(0.04, 0.5, 2) * (width, height)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5)))
    grain = rng.normal(0, 12, (height, width, 1)).astype(np.float32)
    return np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8)


def _write(job: tuple[Path, int, int, int]) -> int:
    folder, i, width, height = job
    path = folder / f"class{i % CLASSES}" / f"{i:06d}.jpg"
    Image.fromarray(_photo(i, width, height)).save(path, quality=90)
    return path.stat().st_size


def write_photos(root: Path, count: int, width: int, height: int, processes: int) -> Path:
    """`count` width x height JPEGs in 10 class folders under `root` (kept between runs)."""
    folder = root / f"photos-{count}-{width}x{height}"
    if (folder / ".complete").exists():
        return folder
    for label in range(CLASSES):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [(folder, i, width, height) for i in range(count)]
    with ProcessPoolExecutor(max(1, processes)) as pool:
        sizes = list(pool.map(_write, jobs, chunksize=32))
    seconds = time.perf_counter() - start
    print(f"wrote {count:,} photos ({sum(sizes) / count / 1024:.0f} KiB each) in {seconds:.0f} s")
    (folder / ".complete").touch()
    return folder


# -- the loaders ------------------------------------------------------------------------------
# A loader's pass: epoch -> (its batches, what the main process does to each before the model
# could take it).
PassFn = Callable[[int], tuple[Iterator[Any], Callable[[Any, int, int], Any]]]


def vitkit_loader(folder: Path, workers: int, batch: int) -> tuple[PassFn, int]:
    """vitkit's streamed training input, as `vitkit train` reads a streamed run: the stream's
    uint8 crops, flipped and augmented in its workers, then `TrainTransform` in the main
    process with each step's own generator."""
    source = FolderSource.open(folder)
    crop = RandomResizedCrop(SCALE, RATIO)
    stream = ImageStream(source, SIZE, 3, crop, seed=0, workers=workers, augment=STREAM_AUGMENT)
    transform = TrainTransform(MAIN_AUGMENT, MEAN, STD, len(source.classes))

    def finish(item: tuple[torch.Tensor, torch.Tensor], epoch: int, step: int) -> torch.Tensor:
        images, labels = item
        gen = torch.Generator().manual_seed(epoch * 1_000_003 + step)
        return transform(images, labels, gen)[0]

    def epoch_pass(epoch: int) -> tuple[Iterator[Any], Callable[[Any, int, int], Any]]:
        order = torch.randperm(len(stream), generator=torch.Generator().manual_seed(epoch))
        return stream.batches(epoch, order.tolist(), batch), finish

    return epoch_pass, len(stream) // batch


def timm_loader(
    folder: Path, workers: int, batch: int, prefetcher: bool, interpolation: str
) -> tuple[PassFn, int, Any]:
    """timm's training loader on the CPU (a fresh dataset each: `create_loader` sets its
    transform), and the dataset."""
    data = import_timm().data
    dataset = data.ImageDataset(str(folder))
    loader = data.create_loader(
        dataset,
        input_size=(3, SIZE, SIZE),
        batch_size=batch,
        is_training=True,
        no_aug=False,
        scale=SCALE,
        ratio=RATIO,
        hflip=0.5,
        auto_augment=RANDAUGMENT,
        interpolation=interpolation,
        mean=MEAN,
        std=STD,
        num_workers=workers,
        use_prefetcher=prefetcher,
        device=torch.device("cpu"),
    )

    def epoch_pass(epoch: int) -> tuple[Iterator[Any], Callable[[Any, int, int], Any]]:
        return iter(loader), lambda item, _epoch, _step: item[0]

    return epoch_pass, len(loader), loader


# -- measuring --------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def children_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each child process of this one (Linux /proc)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            out[int(pid)] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


@dataclass
class Pass:
    ready: list[float]  # seconds from the start of the pass to each batch ready for the model
    main_cpu: float  # CPU seconds of the main process (all its threads) in the pass
    worker_cpu: float  # CPU seconds of the worker processes in the pass


def run_pass(epoch_pass: PassFn, epoch: int, count: int) -> Pass:
    """One epoch of a loader, each batch taken as soon as it comes and made ready."""
    before = children_cpu()
    cpu = time.process_time()
    start = time.perf_counter()
    batches, finish = epoch_pass(epoch)
    ready: list[float] = []
    main_cpu = worker_cpu = 0.0
    for step, item in enumerate(batches):
        x = finish(item, epoch, step)
        assert x.dtype == torch.float32 and x.shape[1:] == (3, SIZE, SIZE), (x.dtype, x.shape)
        ready.append(time.perf_counter() - start)
        if step == count - 1:  # the workers are done, and not yet shut down
            main_cpu = time.process_time() - cpu
            after = children_cpu()
            worker_cpu = sum(t - before.get(pid, 0.0) for pid, t in after.items())
    if len(ready) != count:
        raise SystemExit(f"expected {count} batches in a pass, got {len(ready)}")
    return Pass(ready, main_cpu, worker_cpu)


@dataclass
class Summary:
    passes: list[Pass] = field(default_factory=list)

    def warmup(self) -> float:
        return self.passes[0].ready[0]

    def later_warmup(self) -> float | None:
        later = [p.ready[0] for p in self.passes[1:]]
        return statistics.mean(later) if later else None

    def steady(self, batch: int, workers: int) -> float:
        """Images per second from the `workers`-th batch of each pass to its last."""
        images = seconds = 0.0
        for p in self.passes:
            k = min(max(workers, 1), len(p.ready) - 1) - 1
            images += (len(p.ready) - 1 - k) * batch
            seconds += p.ready[-1] - p.ready[k]
        return images / seconds

    def epoch(self, batch: int) -> float:
        """Images per second over whole passes, warm-up included (later passes, if any)."""
        passes = self.passes[1:] or self.passes
        return sum(len(p.ready) for p in passes) * batch / sum(p.ready[-1] for p in passes)

    def cpu_ms(self, batch: int) -> tuple[float, float]:
        """(main, workers) CPU milliseconds per image."""
        images = sum(len(p.ready) for p in self.passes) * batch
        main = sum(p.main_cpu for p in self.passes)
        return 1000 * main / images, 1000 * sum(p.worker_cpu for p in self.passes) / images


# -- where the time goes ------------------------------------------------------------------------
def _clock() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def profile_workers(files: list[Path], timm_transform: Any) -> tuple[dict, dict, torch.Tensor]:
    """Per-image seconds of vitkit's worker work and of timm's, step by step, in this process
    on one thread (as in a worker), image after image alternating between them; and vitkit's
    crops, stacked into a batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    crop = RandomResizedCrop(SCALE, RATIO)
    ours: dict[str, list[float]] = {
        "decode, full size": [],
        "load_image (decode + crop), whole file (Pillow)": [],
        "load_image (decode + crop), region only (training)": [],
        "  + flip and RandAugment (all in the worker)": [],
    }
    theirs: dict[str, list[float]] = {"decode, full size": []}
    crops = []
    try:
        for i, path in enumerate(files):
            clock = _clock()
            with Image.open(path) as img:
                img.convert("RGB")
            ours["decode, full size"].append(clock())
            clock = _clock()
            load_image(path, 3, SIZE, crop=crop.box(random.Random(i)))
            ours["load_image (decode + crop), whole file (Pillow)"].append(clock())
            clock = _clock()
            box = crop.box(random.Random(i))
            crops.append(load_image(path, 3, SIZE, crop=box, region_decode=True))
            ours["load_image (decode + crop), region only (training)"].append(clock())
            clock = _clock()
            rng = random.Random(i)
            augment = functools.partial(STREAM_AUGMENT, rng=rng)
            load_image(path, 3, SIZE, crop=crop.box(rng), augment=augment, region_decode=True)
            ours["  + flip and RandAugment (all in the worker)"].append(clock())
            # timm's ImageDataset: the file opened and converted to RGB, then the transforms.
            clock = _clock()
            with open(path, "rb") as f:
                x = Image.open(f).convert("RGB")
            theirs["decode, full size"].append(clock())
            for step in timm_transform.transforms:
                clock = _clock()
                x = step(x)
                theirs.setdefault(type(step).__name__, []).append(clock())
    finally:
        torch.set_num_threads(threads)
    return ours, theirs, torch.stack(crops)


def profile_transform(images: torch.Tensor, repeats: int = 3) -> dict[str, float]:
    """Median seconds per batch of vitkit's main-process transform for a streamed run, and for
    comparison of the batched flip and RandAugment that in-memory data goes through (its
    steps, and each RandAugment op applied to the whole batch)."""
    streamed = TrainTransform(MAIN_AUGMENT, MEAN, STD, CLASSES)
    transform = TrainTransform(AUGMENT, MEAN, STD, CLASSES)
    labels = torch.zeros(len(images), dtype=torch.int64)
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        clock = _clock()
        out = fn(*args)
        times.setdefault(name, []).append(clock())
        return out

    ops, magnitude = AUGMENT.randaugment_ops, AUGMENT.randaugment_magnitude
    for r in range(repeats):
        gen = torch.Generator().manual_seed(r)
        timed("TrainTransform, streamed (all)", streamed, images, labels, gen)
    for r in range(repeats):
        gen = torch.Generator().manual_seed(r)
        timed("batched flip + RandAugment (in memory)", transform, images, labels, gen)
        gen = torch.Generator().manual_seed(r)
        x = timed("  uint8 -> float", to_float, images)
        x = timed("  flip", random_hflip, x, gen)
        x = timed("  RandAugment", rand_augment, x, ops, magnitude, gen)
        timed("  normalise", normalize, x, MEAN, STD)
    # Each RandAugment op on the whole batch at magnitude 9 (rand_augment gives each image
    # `ops` of them, picked uniformly, through index gathers and scatters).
    x = to_float(images)
    strength = torch.where(torch.rand(len(x)) < 0.5, -1.0, 1.0) * magnitude / 10
    for op in (op for op in RANDAUGMENT_OPS if op.__name__ != "_identity"):
        for _ in range(repeats):
            timed(f"    op {op.__name__.strip('_')}, whole batch", op, x, strength)
    return {name: statistics.median(ts) for name, ts in times.items()}


# -- the report ---------------------------------------------------------------------------------
def machine() -> str:
    cores = len(os.sched_getaffinity(0))
    turbo = "libjpeg-turbo" if features.check_feature("libjpeg_turbo") else "libjpeg"
    return (
        f"{cpu_name()}, {cores} cores usable, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads in the main process), Pillow {PIL.__version__} "
        f"({turbo} {features.version('jpg')}), timm {import_timm().__version__}, "
        f"Python {sys.version.split()[0]}"
    )


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="photos written and read")
    p.add_argument("--size", type=_size, default=(500, 375), help="photo size, WxH")
    p.add_argument("--workers", type=int, default=default_workers(), help="per loader")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="passes of each loader")
    p.add_argument("--interpolation", default="bicubic", help="timm's (vitkit's is bicubic)")
    p.add_argument("--profile-images", type=int, default=None, help="default: one batch")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the main process (default: torch's)",
    )
    p.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "vitkit-loader")
    args = p.parse_args()
    batch, workers = args.batch, args.workers
    reuse_freed_memory()  # as `vitkit train` does (it also keeps each batch's memory for the next)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.images // batch <= max(workers, 1):
        raise SystemExit("need more batches per pass than workers: raise --images")

    print(f"machine: {machine()}")
    folder = write_photos(args.root, args.images, *args.size, default_workers())
    sizes = [f.stat().st_size for f in folder.glob("class*/*.jpg")]
    print(
        f"photos: {len(sizes):,} JPEGs of {args.size[0]}x{args.size[1]}, "
        f"{statistics.mean(sizes) / 1024:.0f} KiB each, in {folder}"
    )
    print(
        f"{workers} workers per loader, batch {batch}, {args.epochs} passes each, crop at "
        f"{SIZE} px (scale {SCALE}, ratio 3/4-4/3), flip, RandAugment {RANDAUGMENT}, "
        f"timm's filter {args.interpolation}\n"
    )

    ours, count = vitkit_loader(folder, workers, batch)
    theirs, count_timm, timm_plain = timm_loader(folder, workers, batch, False, args.interpolation)
    prefetched, count_pre, timm_pre = timm_loader(folder, workers, batch, True, args.interpolation)
    assert count == count_timm == count_pre, (count, count_timm, count_pre)
    passes = {"vitkit": ours, "timm": theirs, "timm-prefetcher": prefetched}
    results = {name: Summary() for name in LOADERS}
    for epoch in range(args.epochs):
        turn = LOADERS[epoch % len(LOADERS) :] + LOADERS[: epoch % len(LOADERS)]
        for name in turn:
            results[name].passes.append(run_pass(passes[name], epoch, count))
        done = ", ".join(f"{n} {results[n].passes[-1].ready[-1]:.1f} s" for n in turn)
        print(f"round {epoch + 1}/{args.epochs}: {done}", flush=True)

    steady = {n: r.steady(batch, workers) for n, r in results.items()}
    epoch_rate = {n: r.epoch(batch) for n, r in results.items()}
    print(
        f"\n{'loader':16} {'warm-up s':>9} {'later s':>8} {'steady img/s':>12} "
        f"{'vitkit/this':>11} {'epoch img/s':>11} {'vitkit/this':>11} {'CPU ms/img: main':>16} "
        f"{'workers':>8} {'total':>6}"
    )
    for name, r in results.items():
        later = r.later_warmup()
        main_ms, worker_ms = r.cpu_ms(batch)
        print(
            f"{name:16} {r.warmup():9.2f} {'-' if later is None else f'{later:.2f}':>8} "
            f"{steady[name]:12.1f} {steady['vitkit'] / steady[name]:10.2f}x "
            f"{epoch_rate[name]:11.1f} {epoch_rate['vitkit'] / epoch_rate[name]:10.2f}x "
            f"{main_ms:16.2f} {worker_ms:8.2f} {main_ms + worker_ms:6.2f}"
        )
    best = max(("timm", "timm-prefetcher"), key=lambda n: steady[n])
    ratio = steady["vitkit"] / steady[best]
    verdict = "met" if ratio >= 1.3 else "NOT met"
    print(
        f"\nvitkit / timm's faster loader ({best}), steady: {ratio:.2f}x "
        f"(target >= 1.3x: {verdict}); whole epochs: "
        f"{epoch_rate['vitkit'] / max(epoch_rate['timm'], epoch_rate['timm-prefetcher']):.2f}x"
    )

    # Where vitkit's time goes.
    m = min(args.profile_images or batch, args.images)
    files = sorted(folder.glob("class*/*.jpg"))[:: max(1, args.images // m)][:m]
    ours_steps, timm_steps, crops = profile_workers(files, timm_plain.dataset.transform)
    per_batch = profile_transform(crops)
    print(f"\nwhere the time goes ({m} images, timed in this process)")
    print("vitkit's workers, per image (1 thread):")
    for name, ts in ours_steps.items():
        print(f"  {name:52} {1000 * statistics.median(ts):7.2f} ms")
    decode = ours_steps["decode, full size"]
    crop = ours_steps["load_image (decode + crop), region only (training)"]
    beyond = [b - a for a, b in zip(decode, crop, strict=True)]
    print(f"  {'  of which beyond decoding':52} {1000 * statistics.median(beyond):7.2f} ms")
    threads = torch.get_num_threads()
    print(f"vitkit's main process, per batch of {m} ({threads} threads):")
    for name, seconds in per_batch.items():
        print(f"  {name:36} {1000 * seconds:7.1f} ms  {1000 * seconds / m:6.2f} ms/img")
    print("timm's workers, per image (1 thread):")
    total = 0.0
    for name, ts in timm_steps.items():
        ms = 1000 * statistics.median(ts)
        total += ms
        print(f"  {name:36} {ms:7.2f} ms")
    print(f"  {'(sum of medians)':36} {total:7.2f} ms")
    del timm_plain, timm_pre  # their persistent workers end


if __name__ == "__main__":
    main()
