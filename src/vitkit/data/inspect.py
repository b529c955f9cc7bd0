"""`vitkit data inspect`: what a collection holds (classes, images per class, sizes, formats,
bytes) and every file or sample in it that cannot be read, with the reason. Every image is
decoded (a JPEG at a reduced scale) to find those; nothing stops at a bad file.
"""

from __future__ import annotations

import statistics
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vitkit.data.dataset import DatasetError
from vitkit.data.folder import PROGRESS_MIN_FILES, find_classes, list_images, printable
from vitkit.data.hf import open_hf
from vitkit.data.manifest import ManifestSource
from vitkit.data.preprocess import UnreadableImage
from vitkit.data.shard_fetch import fetch_shards, is_remote
from vitkit.data.shards import (
    _PROGRESS_MIN_BYTES,
    MANIFEST,
    ShardSet,
    _read_shard,
    _shard_problem,
    format_bytes,
    probe_image,
    read_file_bytes,
    unreadable_reason,
)
from vitkit.data.sources import metadata_files, source_kind
from vitkit.data.stream import Source, SubsetSource


@dataclass
class SourceReport:
    """What `inspect_source` found in an image folder or a shard set (or, in `splits`, in each
    split of one)."""

    source: str
    kind: str  # "image folder", "shard set", or "splits"
    classes: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # readable images per class
    width: tuple[int, int, int] | None = None  # min, median, max, as stored
    height: tuple[int, int, int] | None = None
    formats: dict[str, int] = field(default_factory=dict)
    total_bytes: int = 0  # of the readable images
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    ignored: int = 0  # files that are not images by their names
    shards: int = 0
    splits: dict[str, SourceReport] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return sum(self.counts)

    def format(self, max_listed: int = 100) -> str:
        """The report for people: at most `max_listed` unreadable files are named."""
        if self.splits:
            parts = [printable(f"{self.source}: splits {', '.join(self.splits)}")]
            return "\n".join(parts + [s.format(max_listed) for s in self.splits.values()])
        head = (
            f"{self.source}: {self.kind}, {len(self.classes)} classes, {self.images} images, "
            f"{format_bytes(self.total_bytes)}"
        )
        head += f" in {self.shards} shard(s)" if self.kind == "shard set" else ""
        head += f", {len(self.unreadable)} unreadable" if self.unreadable else ""
        lines = [head]
        counts = list(zip(self.classes, self.counts, strict=True))
        if 0 < len(counts) <= 50:
            lines.append("  images per class: " + ", ".join(f"{c} {n}" for c, n in counts))
        elif counts:
            ranked = sorted(counts, key=lambda cn: cn[1])
            median = statistics.median_low(self.counts)
            lines.append(
                f"  images per class: min {ranked[0][1]} ({ranked[0][0]}), median {median}, "
                f"max {ranked[-1][1]} ({ranked[-1][0]})"
            )
        if self.width is not None and self.height is not None:
            lines.append("  width  min / median / max: " + " / ".join(map(str, self.width)))
            lines.append("  height min / median / max: " + " / ".join(map(str, self.height)))
        if self.formats:
            lines.append("  formats: " + ", ".join(f"{k} {n}" for k, n in self.formats.items()))
        if self.ignored:
            lines.append(f"  ignored {self.ignored} file(s) that are not images by their names")
        if self.unreadable:
            lines.append("  unreadable:")
            lines += [f"    {where}: {reason}" for where, reason in self.unreadable[:max_listed]]
            if len(self.unreadable) > max_listed:
                lines.append(f"    ... and {len(self.unreadable) - max_listed} more")
        return "\n".join(printable(line) for line in lines)


class _Tally:
    """Counts, sizes and formats of the images of a source, as they are met."""

    def __init__(self, n_classes: int) -> None:
        self.counts = [0] * n_classes
        self.widths, self.heights = array("l"), array("l")
        self.formats: Counter[str] = Counter()
        self.bytes = 0
        self.unreadable: list[tuple[str, str]] = []

    def add(self, where: str, label: int, data: bytes) -> None:
        try:
            fmt, w, h = probe_image(data)
        # Pillow's decoders raise many exception types on broken input; all mean "unreadable".
        except Exception as e:
            self.unreadable.append((where, unreadable_reason(e)))
            return
        if label >= len(self.counts):  # a shard set without class names: classes grow
            self.counts += [0] * (label + 1 - len(self.counts))
        self.counts[label] += 1
        self.widths.append(w)
        self.heights.append(h)
        self.formats[fmt] += 1
        self.bytes += len(data)

    def report(self, source: Path | str, kind: str, classes: list[str], **kw: Any) -> SourceReport:
        def spread(values: array) -> tuple[int, int, int] | None:
            if not values:
                return None
            return min(values), statistics.median_low(values), max(values)

        classes = classes + [str(i) for i in range(len(classes), len(self.counts))]
        return SourceReport(
            source=str(source),
            kind=kind,
            classes=classes,
            counts=self.counts + [0] * (len(classes) - len(self.counts)),
            width=spread(self.widths),
            height=spread(self.heights),
            formats=dict(self.formats.most_common()),
            total_bytes=self.bytes,
            unreadable=self.unreadable,
            **kw,
        )


def inspect_source(path: str | Path) -> SourceReport:
    """Describes a collection (`vitkit.data.sources`: an image folder, a manifest, a shard set,
    a Hugging Face dataset; each split of one that has them): classes, images per class, their
    sizes, formats and bytes, and every file or sample that cannot be read, with the reason."""
    text, p = str(path), Path(path)
    kind = source_kind(path)
    if kind == "manifest":  # a manifest file, or a folder with imagefolder metadata
        files = metadata_files(p) if p.is_dir() else {"all": p}
        if "all" in files:
            return _inspect(ManifestSource.open(files["all"]), text, "manifest")
        parts = {
            name: _inspect(ManifestSource.open(f), str(f), "manifest") for name, f in files.items()
        }
        return SourceReport(source=text, kind="splits", splits=parts)
    if kind == "hf":
        splits = {name: open_hf(path, name) for name in ("train", "val")}
        if all(isinstance(s, SubsetSource) for s in splits.values()):  # one split, not two
            return _inspect(open_hf(path, "all"), text, "Hugging Face dataset")
        parts = {name: _inspect(s, text, "Hugging Face dataset") for name, s in splits.items()}
        return SourceReport(source=text, kind="splits", splits=parts)
    if kind == "shards" and (p / "train" / MANIFEST).is_file():
        names = [name for name in ("train", "val", "test") if (p / name / MANIFEST).is_file()]
        parts = {name: _inspect_shards(ShardSet(p / name), str(p / name)) for name in names}
        return SourceReport(source=text, kind="splits", splits=parts)
    if kind == "shards":
        local = fetch_shards(text)[0] if is_remote(path) else path  # fetched once, then read
        return _inspect_shards(ShardSet(local), text)
    if kind == "folder":
        held_out = [name for name in ("val", "test") if (p / name).is_dir()]
        if (p / "train").is_dir() and held_out:
            splits = {name: inspect_source(p / name) for name in ("train", *held_out)}
            return SourceReport(source=text, kind="splits", splits=splits)
        if (p / "train").is_dir():
            p = p / "train"  # a train/ folder alone holds the classes
        return _inspect_folder(p)
    raise DatasetError(
        f"{printable(text)}: not an image folder, manifest, shard set or Hugging Face dataset"
    )


def _inspect(source: Source, text: str, kind: str) -> SourceReport:
    """Any source, image by image."""
    tally = _Tally(len(source.classes))
    quiet = len(source) < PROGRESS_MIN_FILES
    for i in tqdm(range(len(source)), desc=f"inspecting {source.name}", unit="img", disable=quiet):
        try:
            image = source.read(i)
            data = read_file_bytes(image) if isinstance(image, Path) else image.read()
        except UnreadableImage as e:
            tally.unreadable.append((e.path, e.reason))
            continue
        except OSError as e:  # reading a file a path names
            tally.unreadable.append((str(image), unreadable_reason(e)))
            continue
        tally.add(str(image) if isinstance(image, Path) else image.name, source.labels[i], data)
    return tally.report(text, kind, list(source.classes))


def _inspect_folder(root: Path) -> SourceReport:
    classes = find_classes(root)
    files, labels, ignored = list_images(root, classes)
    tally = _Tally(len(classes))
    quiet = len(files) < PROGRESS_MIN_FILES
    for path, label in tqdm(
        zip(files, labels, strict=True),
        total=len(files),
        desc=f"inspecting {root.name}",
        unit="img",
        disable=quiet,
    ):
        where = str(path.relative_to(root))
        try:
            data = read_file_bytes(path)
        except OSError as e:
            tally.unreadable.append((where, unreadable_reason(e)))
            continue
        tally.add(where, label, data)
    return tally.report(root, "image folder", classes, ignored=ignored)


def _inspect_shards(shardset: ShardSet, source: str) -> SourceReport:
    classes = shardset.classes or []
    tally = _Tally(len(classes))
    entries = shardset._entries or [None] * len(shardset.shards)
    # In bytes of images, which nearly fill a shard: a set's bytes are known, its samples not.
    total = sum(path.stat().st_size for path in shardset.shards)
    quiet = total < _PROGRESS_MIN_BYTES
    with tqdm(total=total, desc="inspecting", unit="B", unit_scale=True, disable=quiet) as bar:
        for path, entry in zip(shardset.shards, entries, strict=True):
            if entry is not None and (problem := _shard_problem(path, entry)) is not None:
                tally.unreadable.append((str(path), problem))
            problems: list[tuple[str, str]] = []
            n_classes = len(classes) if classes else None
            try:
                for key, ext, data, label in _read_shard(path, n_classes, problems, strict=False):
                    tally.add(f"{path}:{key}.{ext}", label, data)
                    bar.update(len(data))
            except DatasetError as e:  # not a tar at all: the report says so, and goes on
                reason = str(e).removeprefix(f"{printable(str(path))}: ")
                tally.unreadable.append((str(path), reason))
            tally.unreadable += problems
    return tally.report(source, "shard set", classes, shards=len(shardset.shards))
