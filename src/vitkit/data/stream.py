"""Image collections too large for memory: read file by file and decoded in DataLoader worker
processes, each training image cropped at random from the full-resolution file.

    source = FolderSource.open("photos/", subset="train")
    stream = ImageStream(source, image_size=224, channels=3, crop=RandomResizedCrop(...))
    for images, labels in stream.batches(epoch, order, start=0, size=256): ...

Every sample's randomness derives from (seed, epoch, index) alone, so the batches are the same
(bit for bit) for any number of worker processes, and a run resumed at step k reads exactly
the batches an uninterrupted one would from there. An unreadable file is replaced by the next
readable one in the collection (deterministically), and named in `skipped` for the epoch's
report. In-memory datasets (`ImageDataset`) stay the fast path for what fits: `memory_budget`
and `should_stream` decide.
"""

from __future__ import annotations

import functools
import math
import os
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vitkit.data.dataset import DatasetError, ImageDataset, split_indices
from vitkit.data.folder import PROGRESS_MIN_FILES, find_classes, list_images, printable
from vitkit.data.preprocess import Crop, UnreadableImage, centre_crop, load_image
from vitkit.data.sample_augment import SampleAugment

# An unreadable file: (its name, why).
Bad = tuple[str, str]
# A stream tries this many files in a row before it calls a collection unreadable.
MAX_UNREADABLE_RUN = 64
# In-memory datasets may take this share of the memory available when training starts: a
# folder of photos is decoded in one process before the first step (some 7 ms an image), and
# its memory is held for the whole run; 5% of 24 GiB holds ~8,000 images at 224 px.
MEMORY_SHARE = 0.05


class Source(Protocol):
    """A collection read by index: image `i`'s file (a path, or a file object named by its
    `name`, e.g. a tar member or a dataset row's bytes) and label. Folders, manifests, indexed
    shards and Hugging Face datasets are sources."""

    labels: list[int]
    classes: list[str]
    name: str

    def __len__(self) -> int: ...

    def read(self, i: int) -> Path | BinaryIO: ...


@dataclass
class FolderSource:
    """The files of an image folder (one subfolder per class) and their labels."""

    files: list[Path]
    labels: list[int]
    classes: list[str]
    name: str

    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        classes: Sequence[str] | None = None,
        subset: str = "all",
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> FolderSource:
        """The images under `root`/<class>/, listed (not decoded); `subset` "train" or "val"
        keeps one part of the same stratified split as `load_image_folder`'s."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: not a directory")
        names = list(classes) if classes is not None else find_classes(root)
        files, labels, _ = list_images(root, names)
        keep = split_indices(labels, subset, val_fraction, seed)
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        if not files:
            part = "" if subset == "all" else f" in its {subset} part"
            raise DatasetError(f"{root}: no image files{part}")
        return cls(files, labels, names, root.name)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> Path:
        return self.files[i]


@dataclass
class SubsetSource:
    """Some of a source's images, by index (e.g. one part of a split)."""

    source: Source
    indices: list[int]

    def __post_init__(self) -> None:
        self.labels = [self.source.labels[i] for i in self.indices]
        self.classes, self.name = self.source.classes, self.source.name

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int) -> Path | BinaryIO:
        return self.source.read(self.indices[i])


def split_source(source: Source, subset: str, val_fraction: float, seed: int) -> Source:
    """`subset` of `source` split as `split_indices` splits (the source itself for "all")."""
    if subset == "all":
        return source
    keep = split_indices(source.labels, subset, val_fraction, seed)
    if not keep:
        raise DatasetError(f"{source.name}: no images in its {subset} part")
    return SubsetSource(source, keep)


@dataclass(frozen=True)
class RandomResizedCrop:
    """A random box of `scale` of the image's area and aspect ratio in `ratio` (log-uniform),
    as timm and torchvision draw it: 10 tries, then the centre crop with the ratio clamped."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def box(self, rng: random.Random) -> Crop:
        """A box drawn from `rng` on its first use and the same on every later one:
        `load_image` asks for it twice (the JPEG's reduced scale, then the resize)."""
        drawn: list[tuple[float, float, float, float]] = []

        def crop(w: int, h: int) -> tuple[float, float, float, float]:
            if not drawn:
                drawn.append(draw(w, h))
            return drawn[0]

        def draw(w: int, h: int) -> tuple[float, float, float, float]:
            area = w * h
            log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
            for _ in range(10):
                target = area * rng.uniform(*self.scale)
                aspect = math.exp(rng.uniform(*log_ratio))
                cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
                if 0 < cw <= w and 0 < ch <= h:
                    x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                    return x / w, y / h, (x + cw) / w, (y + ch) / h
            aspect = min(max(w / h, self.ratio[0]), self.ratio[1])
            cw, ch = (w, w / aspect) if w / h < aspect else (h * aspect, h)
            return (w - cw) / 2 / w, (h - ch) / 2 / h, (w + cw) / 2 / w, (h + ch) / 2 / h

        return crop


class _Decoded(Dataset):
    """Sample (epoch, index) -> (uint8 image, label, unreadable files passed over)."""

    def __init__(
        self,
        source: Source,
        image_size: int,
        channels: int,
        crop: RandomResizedCrop | None,
        seed: int,
        crop_pct: float = 1.0,
        replace: bool = True,
        augment: SampleAugment | None = None,
    ) -> None:
        self.source, self.image_size, self.channels = source, image_size, channels
        self.crop, self.seed, self.crop_pct, self.replace = crop, seed, crop_pct, replace
        self.augment = augment or None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int, list[Bad]]:
        """The image at `index` or, unreadable, the next readable one (`replace`) or None."""
        epoch, index = key
        n, bad = len(self.source), []
        for tries in range(min(n, MAX_UNREADABLE_RUN) if self.replace else 1):
            i = (index + tries) % n
            # A string seed: Python hashes it with sha512, the same in every process.
            rng = random.Random(f"{self.seed}:{epoch}:{i}")
            crop = self.crop.box(rng) if self.crop else centre_crop(self.crop_pct)
            augment = functools.partial(self.augment, rng=rng) if self.augment else None
            try:
                image = load_image(
                    self.source.read(i),
                    self.channels,
                    self.image_size,
                    crop=crop,
                    augment=augment,
                    region_decode=self.crop is not None,  # training's random crops
                )
            except UnreadableImage as e:
                bad.append((e.path, e.reason))
                continue
            return image, self.source.labels[i], bad
        if not self.replace:
            return None, -1, bad
        raise DatasetError(
            printable(f"{self.source.name}: {len(bad)} unreadable files in a row, e.g. {bad[0][0]}")
        )


def _collate(
    items: list[tuple[torch.Tensor | None, int, list[Bad]]],
) -> tuple[torch.Tensor, torch.Tensor, list[Bad]]:
    """One batch of the readable items (all of them, unless `_Decoded` does not replace)."""
    bad = [path for _, _, paths in items for path in paths]
    items = [item for item in items if item[0] is not None]
    if not items:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad
    images = torch.stack([image for image, _, _ in items if image is not None])
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
    return images, labels, bad


def _one_thread(_: int) -> None:
    # Each worker decodes one image at a time; torch's own threads would only contend.
    torch.set_num_threads(1)


class ImageStream:
    """Batches of uint8 images decoded from a `Source` in `workers` processes: random crops
    (`crop`) then per-image flips and RandAugment (`augment`), all seeded by `seed`; or the
    centre crop of `crop_pct` (see `centre_crop`)."""

    def __init__(
        self,
        source: Source,
        image_size: int,
        channels: int,
        crop: RandomResizedCrop | None = None,
        seed: int = 0,
        workers: int | None = None,
        crop_pct: float = 1.0,
        augment: SampleAugment | None = None,
    ) -> None:
        self.source, self.classes, self.name = source, source.classes, source.name
        self.labels = torch.tensor(source.labels, dtype=torch.int64)
        self.image_size, self.channels, self.crop_pct = image_size, channels, crop_pct
        self.workers = default_workers() if workers is None else workers
        self.augment = augment or None
        self._data = _Decoded(
            source, image_size, channels, crop, seed, crop_pct, augment=self.augment
        )
        self.skipped: dict[str, None] = {}  # in the order met, each once

    def __len__(self) -> int:
        return len(self.source)

    def batches(
        self,
        epoch: int,
        order: Sequence[int],
        size: int,
        start: int = 0,
        drop_last: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `order` (this epoch's sample indices) from batch `start` on, each of
        `size` images (a last, shorter one only if not `drop_last`)."""
        count = len(order) // size if drop_last else -(-len(order) // size)
        steps = [
            [(epoch, int(i)) for i in order[k * size : (k + 1) * size]] for k in range(start, count)
        ]
        if not steps:
            return
        loader = DataLoader(
            self._data,
            batch_sampler=steps,
            num_workers=self.workers,
            collate_fn=_collate,
            worker_init_fn=_one_thread if self.workers else None,
            prefetch_factor=4 if self.workers else None,
            persistent_workers=False,
        )
        for images, labels, bad in loader:
            self.skipped.update(dict.fromkeys(printable(f"{p}: {r}") for p, r in bad))
            yield images, labels

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """Up to `n` images at random (fixed by `seed`), centre-cropped: e.g. the calibration
        images a trained model keeps."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        batch = min(n, len(self))
        batches = _centre(self).batches(0, order[:batch].tolist(), batch)
        try:
            return next(batches)[0]
        finally:
            # Closed now, not when collected: its worker processes end here, and are no
            # longer watched by the DataLoader's SIGCHLD handler.
            batches.close()


def decode_all(
    source: Source,
    image_size: int,
    channels: int,
    workers: int | None = None,
    crop_pct: float = 1.0,
) -> ImageDataset:
    """Every readable image of `source` decoded into memory (the centre crop of `crop_pct`) in
    `workers` processes; unreadable ones are left out, listed in `skipped` and summarised on
    stderr."""
    workers = default_workers() if workers is None else workers
    data = _Decoded(source, image_size, channels, None, 0, crop_pct, replace=False)
    steps = [
        [(0, i) for i in range(k, min(k + 256, len(source)))] for k in range(0, len(source), 256)
    ]
    loader = DataLoader(
        data,
        batch_sampler=steps,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_one_thread if workers else None,
    )
    images = torch.empty((len(source), channels, image_size, image_size), dtype=torch.uint8)
    labels, kept = torch.empty(len(source), dtype=torch.int64), 0
    skipped: list[Bad] = []
    quiet = len(source) < PROGRESS_MIN_FILES
    with tqdm(total=len(source), desc=f"loading {source.name}", unit="img", disable=quiet) as bar:
        for batch, batch_labels, bad in loader:
            images[kept : kept + len(batch)] = batch
            labels[kept : kept + len(batch)] = batch_labels
            kept += len(batch)
            skipped += bad
            bar.update(len(batch) + len(bad))
    if not kept:
        raise DatasetError(printable(f"{source.name}: no readable images, e.g. {skipped[0][0]}"))
    if skipped:
        where, reason = skipped[0]
        print(
            printable(
                f"warning: {source.name}: skipped {len(skipped)} unreadable image(s), e.g. "
                f"{where}: {reason}"
            ),
            file=sys.stderr,
        )
    return ImageDataset(
        images[:kept].clone() if kept < len(source) else images,
        labels[:kept].clone(),
        list(source.classes),
        source.name,
        skipped,
    )


def _centre(stream: ImageStream) -> ImageStream:
    """The same files without random crops (evaluation, samples)."""
    return ImageStream(
        stream.source,
        stream.image_size,
        stream.channels,
        workers=stream.workers,
        crop_pct=stream.crop_pct,
    )


def default_workers() -> int:
    """Decoding processes: one per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def memory_budget() -> int:
    """Bytes an in-memory dataset may take: MEMORY_SHARE of the memory available now
    (Linux's MemAvailable), or of 8 GiB where that cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * MEMORY_SHARE)
    except (OSError, ValueError, IndexError):
        pass
    return int(8 * 2**30 * MEMORY_SHARE)


def in_memory_bytes(images: int, channels: int, image_size: int) -> int:
    """What `images` take decoded into memory at `image_size` (uint8)."""
    return images * channels * image_size * image_size


def stream_choice(
    images: int, channels: int, image_size: int, asked: bool | None = None
) -> tuple[bool, str]:
    """Whether `images` files are streamed rather than decoded into memory: as `asked`, else
    when they would take more than `memory_budget()`; and why, in words."""
    if asked is not None:
        return asked, ("streamed from its files" if asked else "decoded into memory") + ", as asked"
    need, budget = in_memory_bytes(images, channels, image_size), memory_budget()
    how = "streamed from its files" if need > budget else "decoded into memory"
    return need > budget, (
        f"{images:,} images would take {need / 2**30:.2f} GiB at {image_size} px; the budget "
        f"is {budget / 2**30:.2f} GiB ({MEMORY_SHARE:.0%} of the memory available): {how} "
        "(--stream / --in-memory choose)"
    )
