"""WebDataset shards read sample by sample, as a map-style `Source` like an image folder.

Each tar's headers are read once when the set is opened (the image members' offsets and
sizes, and the labels; not the images), so any sample can then be read by index, as `wids`
reads indexed shards. Training from shards therefore keeps every guarantee of a folder: each
sample's randomness derives from (seed, epoch, index), each process reads a disjoint slice of
each epoch, and a run resumes at the exact sample. It needs the shards as files (local, or
on a shared or cached file system); `ShardSet.samples` reads them front to back instead.

An index is kept while it is in use, and opening the same unchanged shards again reuses it:
the training and held-out parts of a set split by fraction are indexed once, not twice.
"""

from __future__ import annotations

import io
import os
import sys
import weakref
from array import array
from pathlib import Path

from tqdm import tqdm

from vitkit.data.dataset import DatasetError
from vitkit.data.folder import printable
from vitkit.data.preprocess import UnreadableImage, open_regular
from vitkit.data.shards import MAX_MEMBER_BYTES, ShardSet, index_shard

# Index more shards than this and a progress bar shows it.
_PROGRESS_MIN_SHARDS = 8
# Key: a set's name, its classes and (path, device, inode, size, mtime) of each shard.
_Signature = tuple[str, tuple[str, ...] | None, tuple[tuple[str, int, int, int, int], ...]]


class ShardSource:
    """The samples of a `ShardSet`, indexed: `read(i)` gives sample i's image bytes."""

    def __init__(self, shardset: ShardSet, name: str) -> None:
        self.name, self.shards = name, shardset.shards
        classes = shardset.classes
        self._shard, self._offset, self._size = array("I"), array("Q"), array("I")
        self.labels: list[int] = []
        self.keys: list[str] = []
        problems: list[tuple[str, str]] = []
        bar = tqdm(
            self.shards,
            desc=f"indexing {name}",
            unit="shard",
            disable=len(self.shards) <= _PROGRESS_MIN_SHARDS,
        )
        for j, path in enumerate(bar):
            n_classes = len(classes) if classes else None
            for key, ext, (offset, size), label in index_shard(path, n_classes, problems):
                self._shard.append(j)
                self._offset.append(offset)
                self._size.append(size)
                self.labels.append(label)
                self.keys.append(f"{key}.{ext}")
        if not self.labels:
            raise DatasetError(printable(f"{name}: no samples in {len(self.shards)} shard(s)"))
        if problems:
            where, reason = problems[0]
            print(
                printable(
                    f"warning: {name}: left out {len(problems)} damaged sample(s), e.g. "
                    f"{where}: {reason}"
                ),
                file=sys.stderr,
            )
        self.skipped = problems
        self.classes = classes or [str(c) for c in range(max(self.labels) + 1)]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> io.BytesIO:
        path, size = self.shards[self._shard[i]], self._size[i]
        where = f"{path}:{self.keys[i]}"
        if size > MAX_MEMBER_BYTES:  # indexed under the same bound; the file may have changed
            raise UnreadableImage(where, f"{size:,} bytes, too large for a member")
        try:
            with open_regular(path) as f:
                f.seek(self._offset[i])
                data = f.read(size)
        except OSError as e:
            raise UnreadableImage(where, e.strerror or str(e)) from None
        if len(data) != size:
            raise UnreadableImage(where, "the shard is shorter than when it was indexed")
        image = io.BytesIO(data)
        image.name = where
        return image


# The indexes in use (weakly held: one goes when its last user does), by what they index.
_INDEXED: weakref.WeakValueDictionary[_Signature, ShardSource] = weakref.WeakValueDictionary()


def open_shards(spec: str | Path, name: str | None = None) -> ShardSource:
    """A shard set (its directory or `shards.json`, a brace pattern, or one .tar), indexed; the
    index of the same shards is reused while it is in use and none of them has changed."""
    shardset = ShardSet(spec)
    name = name or _name(spec)
    signature = _signature(shardset, name)
    source = _INDEXED.get(signature)
    if source is None:
        source = ShardSource(shardset, name)
        _INDEXED[signature] = source
    return source


def _signature(shardset: ShardSet, name: str) -> _Signature:
    """What an index is made from: each shard's path and the file it names now (device and
    inode), whose size or modification time changes when it is rewritten."""
    files = []
    for path in shardset.shards:
        try:
            st = os.stat(path)
        except OSError as e:
            raise DatasetError(printable(f"{path}: cannot read: {e.strerror or e}")) from None
        files.append((str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    classes = tuple(shardset.classes) if shardset.classes is not None else None
    return name, classes, tuple(files)


def _name(spec: str | Path) -> str:
    path = Path(spec)
    if path.is_dir():
        return path.name
    return path.parent.name if path.suffix == ".json" else path.stem.split("-{")[0]
