"""WebDataset shards: image folders packed into tar files, read back a stream at a time.

A shard set is a directory of `shards-000000.tar`, `shards-000001.tar`, ... and `shards.json`,
its manifest: format version, class names, and for each shard its file name, sample count,
byte size and SHA-256. A sample is two tar members sharing a key, as WebDataset writes them:
`<class>/<name>.<ext>`, the image file's bytes (jpg, png, ...), and `<class>/<name>.cls`, the
class index as decimal text. Other WebDataset tools read these shards, and `ShardSet` reads
theirs (a brace pattern or a list of tar files; members other than an image and a .cls are
ignored).

`pack_folder` writes a shard set from an image folder (`folder.py`), idempotently: the samples
are in a fixed order, the shards are written whole under temporary names and renamed, and the
manifest is rewritten after each one, so an interrupted run resumes after its last complete
shard and a rerun over a complete set checks the checksums and writes nothing.

`inspect_source` describes an image folder or a shard set, and lists every file it cannot read.

Everything read here is attacker input: tar members and manifests are bounded before they are
read, images are decoded by the rules of `vitkit.data.preprocess`, and a bad file is one line
naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from braceexpand import braceexpand
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm
from webdataset import TarWriter

from vitkit.data.dataset import DatasetError
from vitkit.data.folder import PROGRESS_MIN_FILES, find_classes, list_images, printable
from vitkit.data.preprocess import (
    IMAGE_FORMATS,
    check_pixels,
    image_extensions,
    load_image,
    open_regular,
)
from vitkit.files import atomic_file

MANIFEST = "shards.json"
SHARD_NAME = "shards-{:06d}.tar"
FORMAT, VERSION = "vitkit-shards", 1
# The largest image file or tar member read: far above any photo a ViT is trained on.
MAX_MEMBER_BYTES = 64 << 20
MAX_MANIFEST_BYTES = 64 << 20
# A brace pattern expands to at most this many shard names.
MAX_SHARDS = 1_000_000
# Decimal text of a class index, with room for a newline.
_MAX_LABEL_BYTES = 32
# Labels read without class names (a brace pattern alone) must still be below this.
_MAX_LABEL = 1 << 24
# Reading fewer bytes than this, checksums and shards go without a progress bar.
_PROGRESS_MIN_BYTES = 256 << 20
# Tar names stay within USTAR's 100 characters, extension included.
_MAX_KEY = 80
# The size images are decoded at to prove them readable: every pixel is decoded, a JPEG's at
# its smallest scale, to find truncated and corrupt files that a header looks fine in.
_PROBE_SIZE = 32
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_LABEL = re.compile(rb"\s*([0-9]{1,9})\s*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Tar member extension of each format written; `_READ_EXTENSIONS` are the ones read.
_EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "BMP": "bmp",
    "WEBP": "webp",
    "TIFF": "tiff",
    "PPM": "ppm",
}
_READ_EXTENSIONS = frozenset(ext[1:] for ext in image_extensions())
_TAR_BLOCK = 512
_UNITS = ("kB", "MB", "GB", "TB")
T = TypeVar("T")


# -- Packing -----------------------------------------------------------------------------------


@dataclass
class PackResult:
    """What `pack_folder` did for one output directory (one per split)."""

    out_dir: Path
    classes: list[str]
    shards: int
    samples: int
    bytes: int
    written: int  # shards written by this run: 0 when the set was already complete
    resized: int  # images re-encoded smaller by this run
    skipped: list[tuple[str, str]]  # (file, reason) of the unreadable files, never packed
    ignored: int  # files that are not images by their names

    def format(self) -> str:
        """A few lines for people."""
        what = (
            "complete, checksums verified, nothing written"
            if not self.written
            else f"wrote {self.written} shard(s)"
            + (f", {self.resized} image(s) resized" if self.resized else "")
        )
        lines = [
            printable(
                f"{self.out_dir}: {self.shards} shard(s), {self.samples} images in "
                f"{len(self.classes)} classes, {format_bytes(self.bytes)}; {what}"
            )
        ]
        if self.ignored:
            lines.append(f"  ignored {self.ignored} file(s) that are not images by their names")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} unreadable file(s):")
            lines += [printable(f"    {path}: {reason}") for path, reason in self.skipped]
        return "\n".join(lines)


def pack_folder(
    folder: str | Path,
    out_dir: str | Path,
    shard_bytes: int = 1 << 30,
    max_size: int | None = None,
    *,
    seed: int = 0,
) -> list[PackResult]:
    """Packs an image folder into WebDataset shards of about `shard_bytes` each.

    `folder` holds one subfolder per class, or `train/` and `val/` (or `test/`) folders that do,
    which are packed into `out_dir`/train and `out_dir`/val with the training folder's classes.
    Images are stored as their files' bytes; with `max_size`, an image whose shorter side is
    longer is re-encoded with that shorter side (JPEG quality 95 for lossy sources, PNG for the
    others and for images with transparency), upright by its EXIF orientation. Unreadable files
    are skipped and listed. The samples are in an order fixed by `seed` (the files sorted by
    class and path, then shuffled, so that a shard holds every class and a reader's shuffle
    buffer mixes them), and the tar files carry no time stamps: a rerun writes the same bytes.
    A rerun over complete output checks the checksums and writes nothing; one over an
    interrupted run keeps the complete shards and goes on from there.
    """
    if shard_bytes < 1:
        raise ValueError(f"the shard size must be positive, got {shard_bytes}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"the maximum image size must be positive, got {max_size}")
    root, out_dir = Path(folder), Path(out_dir)
    if not root.is_dir():
        raise DatasetError(printable(f"{root}: not a directory"))
    if out_dir.resolve().is_relative_to(root.resolve()):  # it would be packed as a class
        raise DatasetError(printable(f"{out_dir}: inside the image folder {root}"))
    settings = {"shard_bytes": shard_bytes, "max_size": max_size, "seed": seed}
    train = root / "train"
    held_out = [name for name in ("val", "test") if (root / name).is_dir()]
    if train.is_dir() and held_out:
        classes = find_classes(train)
        return [
            _pack_split(root / name, out_dir / name, classes, settings)
            for name in ("train", *held_out)
        ]
    if train.is_dir():
        root = train  # a train/ folder alone holds the classes, as `load_dataset` reads it
    return [_pack_split(root, out_dir, find_classes(root), settings)]


def _pack_split(
    root: Path, out_dir: Path, classes: list[str], settings: dict[str, Any]
) -> PackResult:
    extra = set(find_classes(root)) - set(classes)
    if extra:
        raise DatasetError(
            printable(f"{root}: class folder(s) {sorted(extra)} not among {classes}")
        )
    files, labels, ignored = list_images(root, classes)
    if not files:
        raise DatasetError(printable(f"{root}: no image files ({ignored} of other types)"))
    keys = _keys(root, files, labels, classes)
    order = list(range(len(files)))
    random.Random(f"pack {settings['seed']}").shuffle(order)
    sources = [(files[i], labels[i], keys[i]) for i in order]
    fingerprint = _fingerprint(root, sources, classes, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".shards*.tmp"):  # what an interrupted run was writing
        stale.unlink()
    shards = _complete_shards(out_dir, fingerprint)
    done = shards[-1]["sources_end"] if shards else 0
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "classes": classes,
        "complete": done == len(sources),
        "source": {"fingerprint": fingerprint, "files": len(sources), **settings},
        "shards": shards,
    }
    writer = _ShardWriter(out_dir, manifest, settings["shard_bytes"])
    resized = 0
    quiet = len(sources) - done < PROGRESS_MIN_FILES
    bar = tqdm(
        total=len(sources), initial=done, desc=f"packing {root.name}", unit="img", disable=quiet
    )
    with bar, writer:
        for i in range(done, len(sources)):
            path, label, key = sources[i]
            try:
                data, fmt, shrunk = _prepare(path, settings["max_size"])
            # Pillow's decoders raise many exception types on broken input; all mean
            # "unreadable", and the file is reported rather than packed.
            except Exception as e:
                writer.skip(str(path.relative_to(root)), unreadable_reason(e))
            else:
                resized += shrunk
                writer.add(i, key, _EXTENSIONS[fmt], data, label)
            bar.update()
        writer.finish(len(sources))
    if not shards:
        where, reason = writer.skipped[0]
        raise DatasetError(
            printable(f"{root}: no readable images ({len(sources)} unreadable; {where}: {reason})")
        )
    return PackResult(
        out_dir=out_dir,
        classes=classes,
        shards=len(shards),
        samples=sum(s["samples"] for s in shards),
        bytes=sum(s["bytes"] for s in shards),
        written=writer.written,
        resized=resized,
        skipped=[(path, reason) for s in shards for path, reason in s["skipped"]],
        ignored=ignored,
    )


class _ShardWriter:
    """Writes samples into shards of about `shard_bytes`, each whole under a temporary name and
    then renamed, and the manifest after each shard."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], shard_bytes: int) -> None:
        self.out_dir, self.manifest, self.shard_bytes = out_dir, manifest, shard_bytes
        self.written = 0
        self.skipped: list[list[str]] = []  # unreadable files since the last shard closed
        self._stack: contextlib.ExitStack | None = None
        self._file: _HashingFile | None = None
        self._tar: TarWriter | None = None
        self._samples = self._content = 0  # in the open shard; its members' bytes

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:  # interrupted: the partial shard's temporary file goes
            self._stack.__exit__(*exc)

    def add(self, index: int, key: str, ext: str, data: bytes, label: int) -> None:
        """Sample `index` of the source order; the open shard is closed first if it is full."""
        size = _tar_size(len(data)) + _tar_size(len(str(label)))
        if self._tar is not None and _tar_file_size(self._content + size) > self.shard_bytes:
            self._close(index)
        if self._tar is None:
            self._stack = contextlib.ExitStack()
            name = SHARD_NAME.format(len(self.manifest["shards"]))
            self._file = _HashingFile(self._stack.enter_context(atomic_file(self.out_dir / name)))
            # No time stamps or owners from this machine, so a rerun writes the same bytes.
            self._tar = TarWriter(self._file, encoder=False, mtime=0, user="", group="")
            self._stack.enter_context(self._tar)
        self._tar.write({"__key__": key, ext: data, "cls": str(label).encode()})
        self._samples += 1
        self._content += size

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append([path, reason])

    def finish(self, end: int) -> None:
        """Completes the set: `end` is the number of sources."""
        if self._tar is not None:
            self._close(end)
        elif self.skipped and self.manifest["shards"]:
            # Only unreadable files after the last shard: they are its to report.
            last = self.manifest["shards"][-1]
            last["sources_end"], last["skipped"] = end, last["skipped"] + self.skipped
            self.skipped = []
            self.manifest["complete"] = True
            _write_manifest(self.out_dir, self.manifest)

    def _close(self, end: int) -> None:
        """Completes the open shard, which holds the sources before `end` or skipped them."""
        assert self._stack is not None and self._file is not None
        self._stack.close()  # the tar's end blocks, then the file synced and renamed
        self.manifest["shards"].append(
            {
                "file": SHARD_NAME.format(len(self.manifest["shards"])),
                "samples": self._samples,
                "bytes": self._file.size,
                "sha256": self._file.sha256.hexdigest(),
                "sources_end": end,
                "skipped": self.skipped,
            }
        )
        # The set is complete in the manifest that lists its last shard.
        self.manifest["complete"] = end == self.manifest["source"]["files"]
        _write_manifest(self.out_dir, self.manifest)
        self.written += 1
        self._stack = self._file = self._tar = None
        self._samples, self._content, self.skipped = 0, 0, []


class _HashingFile:
    """A file written through, counting its bytes and their SHA-256 as they go."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.size, self.sha256 = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)


def _tar_size(n: int) -> int:
    """Bytes a member of `n` bytes takes in a tar file: a header and whole blocks."""
    return _TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK


def _tar_file_size(members: int) -> int:
    """Bytes a tar file takes whose members take `members`: two zero blocks end it, and it is
    padded to whole records."""
    return -(-(members + 2 * _TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _keys(root: Path, files: list[Path], labels: list[int], classes: list[str]) -> list[str]:
    """Sample keys `<class>/<path without suffix>`, in characters that every tool takes
    (`[A-Za-z0-9_-]`, no dots: WebDataset cuts a key at the first one) and unique."""
    used: set[str] = set()
    keys = []
    for path, label in zip(files, labels, strict=True):
        rel = path.relative_to(root / classes[label])
        name = "_".join((*rel.parts[:-1], rel.stem))
        key = f"{_UNSAFE.sub('_', classes[label])}/{_UNSAFE.sub('_', name)}"
        if len(key) > _MAX_KEY:  # shortened, kept apart by a hash of the whole name
            digest = hashlib.sha256(os.fsencode(path.relative_to(root))).hexdigest()[:16]
            key = f"{key[: _MAX_KEY - 24]}_{digest}"
        unique, n = key, 1
        while unique in used:
            n += 1
            unique = f"{key}_{n}"
        used.add(unique)
        keys.append(unique)
    return keys


def _fingerprint(
    root: Path, sources: list[tuple[Path, int, str]], classes: list[str], settings: dict[str, Any]
) -> str:
    """What the shards are made from, so that a resumed run continues the same set: the files'
    names and sizes in order, the classes and the settings."""
    h = hashlib.sha256(json.dumps([VERSION, classes, settings]).encode())
    for path, label, _ in sources:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        h.update(os.fsencode(path.relative_to(root)) + f"\0{label}\0{size}\0".encode())
    return h.hexdigest()


def _complete_shards(out_dir: Path, fingerprint: str) -> list[dict[str, Any]]:
    """The shards of `out_dir` that a previous run of the same packing completed and whose
    checksums still hold, in order; none if it has no manifest."""
    path = out_dir / MANIFEST
    if not path.exists():
        return []
    manifest = read_manifest(path, complete=False)
    source = manifest.get("source")
    if not isinstance(source, dict) or source.get("fingerprint") != fingerprint:
        raise DatasetError(
            printable(f"{path}: shards of another folder or other settings; remove them or ")
            + "write elsewhere"
        )
    shards: list[dict[str, Any]] = []
    total = sum(s["bytes"] for s in manifest["shards"])
    quiet = total < _PROGRESS_MIN_BYTES
    with tqdm(total=total, desc="verifying", unit="B", unit_scale=True, disable=quiet) as bar:
        for entry in manifest["shards"]:
            end, skipped = entry.get("sources_end"), entry.get("skipped")
            start = shards[-1]["sources_end"] if shards else 0
            valid = (
                isinstance(end, int)
                and start < end <= source.get("files", 0)
                and isinstance(skipped, list)
                and all(_is_pair_of_strings(item) for item in skipped)
            )
            if not valid or _shard_problem(out_dir / entry["file"], entry, bar) is not None:
                break  # this shard and those after it are written again
            shards.append(entry)
    return shards


def _is_pair_of_strings(item: Any) -> bool:
    return isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item)


def _prepare(path: Path, max_size: int | None) -> tuple[bytes, str, bool]:
    """(the bytes to store, their format, whether they were re-encoded smaller) of an image
    file, which is decoded whole to prove it readable."""
    data = read_file_bytes(path)
    fmt = probe_image(data)[0]
    if max_size is not None:
        shrunk = _shrink(data, max_size)
        if shrunk is not None:
            return *shrunk, True
    return data, fmt, False


def _shrink(data: bytes, max_size: int) -> tuple[bytes, str] | None:
    """The image re-encoded with its shorter side `max_size` and its EXIF orientation applied,
    or None if its shorter side is no longer."""
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
        w, h = img.size
        if min(w, h) <= max_size:
            return None
        scale = max_size / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        lossy = img.format in ("JPEG", "MPO") or (img.format == "WEBP" and data[12:16] == b"VP8 ")
        icc = img.info.get("icc_profile")
        img.draft(None, size)  # JPEGs decode straight at a reduced scale that covers `size`
        alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        if img.mode == "P" or img.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "I;16"):
            # Palettes would resize by nearest neighbour; other modes are not in PNG or JPEG.
            img = img.convert("RGBA" if alpha else "RGB")
        elif img.mode == "1":
            img = img.convert("L")
        out = ImageOps.exif_transpose(img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3))
    buf = io.BytesIO()
    if lossy and not alpha and out.mode in ("L", "RGB"):
        out.save(buf, "JPEG", quality=95, icc_profile=icc)
        return buf.getvalue(), "JPEG"
    out.save(buf, "PNG", icc_profile=icc)
    return buf.getvalue(), "PNG"


# -- Reading -----------------------------------------------------------------------------------


def read_manifest(path: str | Path, *, complete: bool = True) -> dict[str, Any]:
    """A shard set's manifest, bounded and validated; with `complete`, one whose packing
    finished."""
    path, name = Path(path), printable(str(path))
    try:
        with open_regular(path) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise DatasetError(f"{name}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise DatasetError(f"{name}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest")
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{name}: not valid JSON: {e}") from None
    except RecursionError:
        raise DatasetError(f"{name}: not valid JSON: nested too deeply") from None
    problem = _manifest_problem(manifest)
    if problem is None and complete and manifest.get("complete") is not True:
        problem = "packing was not finished; run `vitkit data pack` again to complete it"
    if problem is not None:
        raise DatasetError(f"{name}: {problem}")
    return manifest


def _manifest_problem(m: Any) -> str | None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return f'not a shard set manifest (no "format": "{FORMAT}")'
    if m.get("version") != VERSION:
        return f"format version {printable(repr(m.get('version')))[:20]}, expected {VERSION}"
    classes = m.get("classes")
    if not isinstance(classes, list) or not classes:
        return '"classes" is not a list of class names'
    if not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        return '"classes" must be distinct strings'
    shards = m.get("shards")
    if not isinstance(shards, list):
        return '"shards" is not a list'
    names = set()
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            return f"shard {i} is not an object"
        name = s.get("file")
        if not isinstance(name, str) or not _is_shard_name(name) or name in names:
            return f'shard {i}: "file" must be a distinct .tar file name in the same folder'
        names.add(name)
        for key in ("samples", "bytes"):
            value = s.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return f"shard {i}: {key!r} must be a whole number"
        if not isinstance(s.get("sha256"), str) or not _HEX64.fullmatch(s["sha256"]):
            return f'shard {i}: "sha256" must be 64 hex digits'
    return None


def _is_shard_name(name: str) -> bool:
    return (
        name == Path(name).name
        and "\\" not in name
        and not name.startswith(".")
        and name.endswith(".tar")
        and name.isprintable()
    )


class ShardSet:
    """WebDataset shards to read: a shard set's directory or manifest (`shards.json`), a brace
    pattern (`data/shards-{000000..000127}.tar`), or a list of tar files.

    Class names come from the manifest, or `classes`; without either, labels are only checked
    to be whole numbers. With `verify`, every shard's size and SHA-256 are checked against the
    manifest first. Damaged samples met while reading (a sample without its image or label, a
    damaged tar) are skipped, listed in `skipped` and reported on stderr; a member over
    `MAX_MEMBER_BYTES` or a label that is not a class index stops reading with a `DatasetError`.
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        *,
        classes: Sequence[str] | None = None,
        verify: bool = False,
    ) -> None:
        self.classes = list(classes) if classes is not None else None
        self.counts: list[int] | None = None  # samples per shard, known from a manifest
        self.skipped: list[tuple[str, str]] = []
        self._entries: list[dict[str, Any]] | None = None
        path = Path(source) if isinstance(source, (str, Path)) else None
        if path is not None and (path.is_dir() or path.suffix == ".json"):
            self._open_manifest(path / MANIFEST if path.is_dir() else path)
        else:
            # Bounded: `{0..999999999}` is a short pattern.
            names = braceexpand(str(source)) if path is not None else iter(source)
            self.shards = [Path(p) for p in islice(names, MAX_SHARDS + 1)]
            if len(self.shards) > MAX_SHARDS:
                raise DatasetError(printable(f"{source}: more than {MAX_SHARDS:,} shards")[:200])
            if not self.shards:
                raise DatasetError("no shard files given")
        missing = next((p for p in self.shards if not p.is_file()), None)
        if missing is not None:
            raise DatasetError(f"{printable(str(missing))}: no such shard file")
        if verify:
            self.verify()

    def _open_manifest(self, path: Path) -> None:
        manifest = read_manifest(path)
        if self.classes is not None and self.classes != manifest["classes"]:
            raise DatasetError(
                printable(f"{path}: classes {manifest['classes']} are not {self.classes}")
            )
        self.classes = manifest["classes"]
        self._entries = manifest["shards"]
        self.shards = [path.parent / s["file"] for s in manifest["shards"]]
        self.counts = [s["samples"] for s in manifest["shards"]]

    @property
    def num_samples(self) -> int | None:
        """The number of samples, known from a manifest only."""
        return sum(self.counts) if self.counts is not None else None

    def verify(self) -> None:
        """Checks each shard's size and SHA-256 against the manifest."""
        if self._entries is None:
            raise DatasetError(f"checksums can only be verified with a {MANIFEST}")
        total = sum(s["bytes"] for s in self._entries)
        with tqdm(
            total=total,
            desc="verifying",
            unit="B",
            unit_scale=True,
            disable=total < _PROGRESS_MIN_BYTES,
        ) as bar:
            for path, entry in zip(self.shards, self._entries, strict=True):
                problem = _shard_problem(path, entry, bar)
                if problem is not None:
                    raise DatasetError(f"{printable(str(path))}: {problem}")

    def samples(
        self,
        epoch: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        worker: int = 0,
        workers: int = 1,
        *,
        start_shard: int = 0,
        buffer: int = 1000,
        buffer_bytes: int = 256 << 20,
    ) -> EpochSamples:
        """The (key, image bytes, label) of one reader's part of an epoch, shuffled.

        The shards are shuffled by (`seed`, `epoch`), the same in every process, and dealt out
        to the `world` x `workers` readers (process `rank`, data-loader `worker`): reader
        r = rank * workers + worker reads shards r, r + world * workers, ... of that order.
        With fewer shards than readers, every reader reads every shard and keeps the samples
        whose index in the shard, plus the shard's position, is r modulo the number of readers.
        Samples then pass through a shuffle buffer of `buffer` samples (and at most
        `buffer_bytes`) seeded by (`seed`, `epoch`, `rank`, `worker`); `buffer=0` keeps the
        shards' order.

        Guarantees: across the readers, every sample is read exactly once per epoch; they read
        equal numbers of samples when the shards divide evenly among them and hold equal
        numbers of samples (`pack_folder`'s hold about equal numbers of bytes); each reader's
        sequence is fixed by (seed, epoch, rank, world, worker, workers, start_shard), and
        does not depend on what the other readers do.
        Resuming is at shard boundaries: the returned iterable's `shards_done` is, after each
        sample, the number of this reader's shards whose samples have all been yielded;
        `start_shard=shards_done` goes on from there, losing none, and repeating the samples
        of later shards that were already yielded: with `buffer=0`, those of the shard being
        read; with a buffer, also those it let out while an earlier shard's last sample waited
        in it (commonly about `buffer`).
        """
        if not 0 <= rank < world or not 0 <= worker < workers:
            raise ValueError(
                "need 0 <= rank < world and 0 <= worker < workers, got "
                f"rank {rank}, world {world}, worker {worker}, workers {workers}"
            )
        if buffer < 0 or buffer_bytes < 0 or start_shard < 0:
            raise ValueError("buffer, buffer_bytes and start_shard must not be negative")
        order = list(range(len(self.shards)))
        random.Random(f"shards {seed} {epoch}").shuffle(order)
        readers, reader = world * workers, rank * workers + worker
        by_index = len(order) < readers
        share = order if by_index else order[reader::readers]
        rng = random.Random(f"buffer {seed} {epoch} {rank} {worker}")
        return EpochSamples(
            self,
            [(p, self.shards[i]) for p, i in enumerate(share)][start_shard:],
            (reader, readers) if by_index else None,
            rng,
            (buffer, buffer_bytes),
            start_shard,
        )


class EpochSamples:
    """One reader's samples of one epoch (`ShardSet.samples`), as (key, image bytes, label).

    `shards_done`: how many of the reader's shards have had all their samples yielded, the
    `start_shard` to resume from."""

    def __init__(
        self,
        shardset: ShardSet,
        shards: list[tuple[int, Path]],
        by_index: tuple[int, int] | None,
        rng: random.Random,
        buffer: tuple[int, int],
        start_shard: int,
    ) -> None:
        self._set, self._shards, self._by_index, self._rng = shardset, shards, by_index, rng
        self._buffer, self._buffer_bytes = buffer
        self._start = self.shards_done = start_shard

    def __iter__(self) -> Iterator[tuple[str, bytes, int]]:
        n = len(self._shards)
        pending, read = [0] * n, [False] * n  # per shard: samples in the buffer, read to the end
        buf: list[tuple[int, str, bytes, int]] = []
        held = done = 0

        def advance() -> None:
            nonlocal done
            while done < n and read[done] and not pending[done]:
                done += 1
            self.shards_done = self._start + done

        def pop() -> tuple[str, bytes, int]:
            nonlocal held
            i = self._rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            j, key, data, label = buf.pop()
            held -= len(data)
            pending[j] -= 1
            advance()
            return key, data, label

        classes = self._set.classes
        for j, (position, path) in enumerate(self._shards):
            problems: list[tuple[str, str]] = []
            samples = _read_shard(path, len(classes) if classes else None, problems, strict=True)
            if self._by_index is not None:
                reader, readers = self._by_index
                samples = (s for i, s in enumerate(samples) if (i + position) % readers == reader)
            for (key, _, data, label), last in _with_last(samples):
                # Known before its last sample is yielded, so that a reader stopped right after
                # it resumes past it.
                read[j] = last
                buf.append((j, key, data, label))
                held += len(data)
                pending[j] += 1
                while buf and (len(buf) > self._buffer or held > self._buffer_bytes):
                    yield pop()
            read[j] = True
            advance()
            if problems:
                self._set.skipped += problems
                where, reason = problems[0]
                print(
                    printable(
                        f"warning: {path}: skipped {len(problems)} damaged sample(s), e.g. "
                        f"{where}: {reason}"
                    ),
                    file=sys.stderr,
                )
        while buf:
            yield pop()


def _with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Each item, and whether it is the last."""
    it = iter(items)
    try:
        previous = next(it)
    except StopIteration:
        return
    for item in it:
        yield previous, False
        previous = item
    yield previous, True


class _Capped:
    """A file whose reads never ask for more than it holds, nor for more than a member may
    have: tarfile reads a pax or long-name header's declared size in one call, and Python
    allocates all that is asked before reading."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f, self._size = f, size

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._size - self._f.tell())
        n = left if n is None or n < 0 else min(n, left)
        return self._f.read(min(n, MAX_MEMBER_BYTES + _TAR_BLOCK))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


@dataclass
class _Sample:
    key: str
    ext: str = ""
    image: bytes | tuple[int, int] | None = None  # its bytes, or (offset, size) in the tar
    label: int | None = None
    problem: str | None = None


def _read_shard(
    path: Path,
    n_classes: int | None,
    problems: list[tuple[str, str]],
    *,
    strict: bool,
    index: bool = False,
) -> Iterator[tuple[str, str, Any, int]]:
    """The samples of a tar file as (key, image extension, image bytes, label), in order; with
    `index`, (offset, size) of the image member in the file instead of its bytes, read from
    the headers alone.

    A sample that lacks its image or label, or whose members are not regular files, and the
    rest of a damaged tar are skipped and appended to `problems` as (where, reason). A member
    over `MAX_MEMBER_BYTES` or a label that is not below `n_classes` is a `DatasetError`, or
    with `strict` False a problem too. A file that is not a tar at all is a `DatasetError`.
    """
    shard = printable(str(path))
    try:
        f = open_regular(path)
    except OSError as e:
        raise DatasetError(f"{shard}: cannot read: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            # Nothing to close but `f`, which the with statement does.
            tar = tarfile.open(fileobj=_Capped(f, size), mode="r:")  # noqa: SIM115
        except tarfile.TarError as e:
            raise DatasetError(f"{shard}: not a tar file ({e})") from None
        limit = n_classes if n_classes is not None else _MAX_LABEL

        def bad(sample: _Sample, member: str, reason: str) -> None:
            if strict:
                raise DatasetError(f"{shard}: member {printable(member)}: {reason}")
            sample.problem = sample.problem or f"{member}: {reason}"

        sample: _Sample | None = None
        try:
            while (m := tar.next()) is not None:
                tar.members.clear()  # TarFile keeps every header it reads; a shard has many
                if m.isdir():
                    continue
                key, _, ext = _split_name(m.name)
                if sample is None or key != sample.key:
                    if sample is not None and (done := _finish(sample, path, problems)):
                        yield done
                    sample = _Sample(key)
                ext = ext.lower()
                if ext != "cls" and ext not in _READ_EXTENSIONS:
                    continue  # another field of a WebDataset sample (json, txt...): not read
                if not m.isfile():
                    sample.problem = sample.problem or f"{m.name}: not a regular file"
                elif m.size > (_MAX_LABEL_BYTES if ext == "cls" else MAX_MEMBER_BYTES):
                    what = "a label" if ext == "cls" else "a member"
                    bad(sample, m.name, f"{m.size:,} bytes, too large for {what}")
                elif (sample.image if ext != "cls" else sample.label) is not None:
                    sample.problem = sample.problem or f"{m.name}: a second {ext} member"
                elif ext != "cls":
                    image = (m.offset_data, m.size) if index else tar.extractfile(m).read()
                    sample.ext, sample.image = ext, image
                else:
                    data = tar.extractfile(m).read()
                    match = _LABEL.fullmatch(data)
                    if match is None or int(match[1]) >= limit:
                        shown = printable(data.decode("utf-8", "replace"))[:20]
                        bad(sample, m.name, f"label {shown!r} is not a class index below {limit}")
                        sample.label = -1
                    else:
                        sample.label = int(match[1])
            offset = _trailing_data(f, tar.offset)
            if offset is not None:
                problems.append((f"{path}", f"damaged after byte {offset:,}: not a tar header"))
        except (tarfile.TarError, OSError) as e:
            where = f"{path}:{sample.key}" if sample is not None else str(path)
            problems.append((where, f"damaged tar: {e}"))
        if sample is not None and (done := _finish(sample, path, problems)):
            yield done


def index_shard(
    path: Path, n_classes: int | None, problems: list[tuple[str, str]]
) -> Iterator[tuple[str, str, tuple[int, int], int]]:
    """The samples of a tar file as (key, image extension, (offset, size) of the image member,
    label), from its headers and labels alone; damaged samples are appended to `problems`,
    and a member too large or a label out of range is a `DatasetError`."""
    return _read_shard(path, n_classes, problems, strict=True, index=True)


def _split_name(name: str) -> tuple[str, str, str]:
    """A member name's (key, ".", extension), split as WebDataset does: at the first dot of
    the last part."""
    folder, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return folder + slash + stem, dot, ext


def _finish(
    sample: _Sample, path: Path, problems: list[tuple[str, str]]
) -> tuple[str, str, Any, int] | None:
    """A sample read whole, or None after noting what it lacks."""
    problem = sample.problem
    if problem is None and sample.image is None:
        problem = "no image member"
    if problem is None and sample.label is None:
        problem = "no .cls label"
    if problem is not None:
        problems.append((f"{path}:{sample.key}", problem))
        return None
    assert sample.image is not None and sample.label is not None
    return sample.key, sample.ext, sample.image, sample.label


def _trailing_data(f: BinaryIO, offset: int) -> int | None:
    """Where bytes other than zeros follow a tar's last member, if they do: tarfile stops
    quietly at the first header it cannot read, and a damaged shard would seem short."""
    f.seek(offset)
    while chunk := f.read(1 << 20):
        if chunk.strip(b"\0"):
            return offset + len(chunk) - len(chunk.lstrip(b"\0"))
        offset += len(chunk)
    return None


def _shard_problem(path: Path, entry: dict[str, Any], bar: tqdm | None = None) -> str | None:
    """Why a shard is not the one its manifest entry describes, or None if it is."""
    h = hashlib.sha256()
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry["bytes"]:
                return f"{size:,} bytes where its manifest says {entry['bytes']:,}"
            while chunk := f.read(1 << 20):
                h.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    if h.hexdigest() != entry["sha256"]:
        return "its SHA-256 is not its manifest's: the file changed or is damaged"
    return None


# -- Files -------------------------------------------------------------------------------------


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    with atomic_file(out_dir / MANIFEST) as f:
        f.write(json.dumps(manifest, indent=1).encode())


def read_file_bytes(path: Path) -> bytes:
    """A regular file's bytes, at most `MAX_MEMBER_BYTES` of them."""
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > MAX_MEMBER_BYTES:
            raise OSError(f"larger than {MAX_MEMBER_BYTES >> 20} MiB")
        data = f.read(MAX_MEMBER_BYTES + 1)
    if len(data) > MAX_MEMBER_BYTES:
        raise OSError(f"larger than {MAX_MEMBER_BYTES >> 20} MiB")
    if not data:
        raise OSError("an empty file")
    return data


def probe_image(data: bytes) -> tuple[str, int, int]:
    """(format, width, height as stored) of an image file's bytes, which are decoded whole by
    the rules of `load_image` (a JPEG at a reduced scale): a corrupt or truncated file raises
    however sound its header."""
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
        if Image.MAX_IMAGE_PIXELS:
            check_pixels(img, 2 * int(Image.MAX_IMAGE_PIXELS))  # where Image.open would refuse
        fmt, (w, h) = img.format or "", img.size
        img.draft(None, (_PROBE_SIZE, _PROBE_SIZE))
        load_image(img, 3, _PROBE_SIZE)
    return fmt, w, h


def unreadable_reason(e: Exception) -> str:
    """Why a file could not be read, in a few words."""
    if isinstance(e, UnidentifiedImageError):
        return f"not an image in a format read here ({', '.join(IMAGE_FORMATS)})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def format_bytes(n: int) -> str:
    """A byte count for people: 1.5 MB (powers of 1000, as disks are sold)."""
    if n < 1000:
        return f"{n} B"
    power = min(len(_UNITS), (len(str(n)) - 1) // 3)
    return f"{n / 1000**power:.1f} {_UNITS[power - 1]}"
