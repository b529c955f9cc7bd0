"""The IDX format of MNIST and Fashion-MNIST: a magic number, big-endian sizes, raw values.

A file is `00 00 <dtype code> <ndim>`, then ndim big-endian uint32 sizes, then exactly
prod(sizes) values, big-endian. A split is two such files, images (N, H, W) uint8 and labels
(N,), named as in the original releases, gzipped or not.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitkit.data.dataset import DatasetError, ImageDataset

# IDX type codes; multi-byte values are big-endian on disk.
_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Where Debian's dataset packages (e.g. dataset-fashion-mnist) install their files.
SYSTEM_DATA_DIR = Path("/usr/share/datasets")
DATA_ENV = "VITKIT_DATA"


@dataclass(frozen=True)
class KnownIdx:
    """A published IDX dataset: its class names, checksums and where to get it."""

    classes: tuple[str, ...]
    # MD5 of each file's *uncompressed* IDX bytes, as published. The archives' own MD5s are
    # not used: Debian's dataset-fashion-mnist re-compresses the files (same content, other
    # gzip bytes), so only the content identifies the original data.
    md5: dict[str, str]
    how_to_get: str


KNOWN: dict[str, KnownIdx] = {
    "fashion-mnist": KnownIdx(
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        how_to_get="install it with `apt-get install dataset-fashion-mnist`, or pass "
        "--data-dir DIR where DIR holds the four IDX files",
    ),
    "mnist": KnownIdx(
        classes=tuple(str(d) for d in range(10)),
        md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        how_to_get="put the four IDX files in a directory and pass --data-dir DIR",
    ),
}


def read_idx(path: str | Path, md5: str | None = None) -> np.ndarray:
    """The array in an IDX file (`.gz` is decompressed), in native byte order.

    With `md5`, the file's content (uncompressed) must have that checksum.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise DatasetError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise DatasetError(f"{path}: unsupported IDX data type code 0x{code:02x}")
    if ndim == 0:
        raise DatasetError(f"{path}: IDX header declares no dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _DTYPES[code]
    expected, actual = math.prod(dims) * dtype.itemsize, len(data) - header
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: {problem}: the header says {'x'.join(map(str, dims))} values of "
            f"{dtype.itemsize} byte(s) ({expected} bytes) but the file holds {actual}"
        )
    if md5 is not None and (digest := _md5(data)) != md5:
        raise DatasetError(
            f"{path}: checksum mismatch (MD5 of the content {digest}, expected {md5}); "
            "the file is corrupt or not the original (IDX files of your own load by their "
            "directory: --data DIR)"
        )
    values = np.frombuffer(data, dtype, count=math.prod(dims), offset=header)
    # A copy in native order: writable (torch shares its memory) and fast to compute with.
    return values.astype(dtype.newbyteorder("=")).reshape(dims)


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror or e}") from None
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: not a valid gzip file ({e})") from None


def load_idx_dir(
    directory: str | Path,
    split: str = "train",
    name: str = "",
    classes: Sequence[str] | None = None,
) -> ImageDataset:
    """One split ("train" or "test") of the IDX files in `directory`.

    A `name` in `KNOWN` brings its class names and checksums. Without a name, a copy of a
    known dataset is recognised by its labels' checksum; any other dataset's classes are
    `classes`, or the label values "0".."max" over both splits.
    """
    directory = Path(directory)
    if split not in FILES:
        raise DatasetError(f"IDX datasets have splits 'train' and 'test', not {split!r}")
    images_path, labels_path = (_find(directory, stem) for stem in FILES[split])
    name = name or _identify(labels_path, FILES[split][1])
    known = KNOWN.get(name)
    images = read_idx(images_path, known.md5[FILES[split][0]] if known else None)
    labels = read_idx(labels_path, known.md5[FILES[split][1]] if known else None)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} "
            f"with {images.ndim} dimension(s)"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(f"{labels_path}: expected one integer label per image")
    if len(labels) != len(images):
        raise DatasetError(
            f"{labels_path} holds {len(labels)} labels for the {len(images)} images "
            f"of {images_path}"
        )
    if len(images) == 0:
        raise DatasetError(f"{images_path}: no images")
    if known:
        classes = known.classes
    elif classes is None:
        classes = [str(i) for i in range(_class_count(directory, split, labels))]
    bad = (labels < 0) | (labels >= len(classes))
    if bad.any():
        i = int(bad.argmax())
        raise DatasetError(
            f"{labels_path}: label {int(labels[i])} (image {i}) is outside 0..{len(classes) - 1}"
        )
    return ImageDataset(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(classes),
        name=name or directory.name,
    )


def _identify(labels_path: Path, stem: str) -> str:
    """The known dataset whose `stem` labels file has this content, or ""."""
    digest = _md5(_read_bytes(labels_path))
    return next((name for name, known in KNOWN.items() if known.md5[stem] == digest), "")


def _class_count(directory: Path, split: str, labels: np.ndarray) -> int:
    """1 + the largest label of either split, so that both splits agree on the classes."""
    largest = int(labels.max())
    for other_split, (_, stem) in FILES.items():
        path = _find(directory, stem, required=False) if other_split != split else None
        if path is not None:
            other = read_idx(path)
            if other.size and other.dtype.kind in "iu":
                largest = max(largest, int(other.max()))
    return largest + 1


def is_idx_dir(directory: str | Path) -> bool:
    """Whether `directory` holds any of the four IDX files (gzipped or not)."""
    stems = [stem for pair in FILES.values() for stem in pair]
    return any(_find(Path(directory), stem, required=False) for stem in stems)


def _find(directory: Path, stem: str, required: bool = True) -> Path | None:
    # The gzipped file first: the form of the original releases.
    for path in (directory / f"{stem}.gz", directory / stem):
        if path.is_file():
            return path
    if required:
        raise DatasetError(f"{directory}: neither {stem}.gz nor {stem} is there")
    return None


def search_dirs(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Where dataset `name` is looked for, in order: `data_dir` (itself, then its `name`
    subfolder) if given; else $VITKIT_DATA/<name>, then the system's dataset directory."""
    if data_dir is not None:
        return [Path(data_dir), Path(data_dir) / name]
    dirs = [Path(os.environ[DATA_ENV]) / name] if os.environ.get(DATA_ENV) else []
    return [*dirs, SYSTEM_DATA_DIR / name]


def load_idx(name: str, split: str = "train", data_dir: str | Path | None = None) -> ImageDataset:
    """One split of a known IDX dataset (see `KNOWN`), found in `search_dirs`."""
    if name not in KNOWN:
        raise DatasetError(f"unknown IDX dataset {name!r}; known: {', '.join(KNOWN)}")
    dirs = search_dirs(name, data_dir)
    for d in dirs:
        if is_idx_dir(d):
            return load_idx_dir(d, split, name)
    stems = [stem for pair in FILES.values() for stem in pair]
    looked = "\n".join(f"  {d}" for d in dirs)
    raise DatasetError(
        f"{name} not found; looked in:\n{looked}\nTo get it, {KNOWN[name].how_to_get} "
        f"({', '.join(f'{s}.gz' for s in stems)})."
    )
