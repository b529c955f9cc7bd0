"""WebDataset shards at an address (HTTP, an object store through a command), copied once
into a local cache as they stream, then read as local shards.

    --data https://host/fmnist/shards.json                       a shard set's manifest
    --data "https://host/fmnist/shards-{000000..000015}.tar"      shards alone (brace pattern)
    --data "pipe:aws s3 cp s3://bucket/fmnist/shards-{000000..000015}.tar -"

Object stores and web servers hand out a shard front to back, while training reads samples by
index (`shard_source.py`) for its guarantees: each sample's randomness derives from (seed,
epoch, index), each process reads a disjoint slice of each epoch, a run resumes at the exact
sample. So each shard is copied once, as it arrives, into `cache_root()/shards/<key>/` (as
`wids` caches remote shards) and the set is read from there; later runs and other processes
read the copies. Addresses are opened by webdataset's `gopen` (curl for http(s), a shell for
`pipe:`, gsutil for gs://).

Everything fetched is attacker input: a manifest is validated (`read_manifest`), each shard is
bounded by its manifest size (else `MAX_SHARD_BYTES`) and by the disk's free space before it
is kept, and with a manifest its SHA-256 must match. Copies are written under temporary names
and renamed once whole, under a lock: an interrupted fetch resumes at the first missing shard,
and processes started together (torchrun) fetch each shard once between them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlparse

from braceexpand import braceexpand
from tqdm import tqdm

from vitkit.data.dataset import DatasetError
from vitkit.data.folder import printable
from vitkit.data.shards import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_SHARDS,
    SHARD_NAME,
    format_bytes,
    read_manifest,
)
from vitkit.files import atomic_file, atomic_write, cache_root

# A shard without a manifest to size it is refused beyond this (pack_folder writes ~1 GB).
MAX_SHARD_BYTES = 64 << 30
# Free space a fetch leaves on the cache's disk.
DISK_MARGIN = 1 << 30
_CHUNK = 1 << 20
# A fetch of fewer bytes than this goes without a progress bar.
_PROGRESS_MIN_BYTES = 16 << 20
# The address a copy came from, for people looking into the cache.
_SOURCE_FILE = "SOURCE"


def is_remote(spec: str | Path) -> bool:
    """Whether `spec` is an address to fetch (scheme://..., or pipe:COMMAND), not a path."""
    if isinstance(spec, Path):
        return False
    return spec.startswith("pipe:") or ("://" in spec and len(urlparse(spec).scheme) > 1)


def fetch_shards(spec: str, cache: Path | None = None) -> tuple[str, str]:
    """The local copy of the shards at `spec` (fetched now where not yet cached) as a spec for
    `ShardSet` (a directory with a manifest, or a brace pattern), and the set's name."""
    _check_scheme(spec)
    directory = (cache or cache_root() / "shards") / hashlib.sha256(spec.encode()).hexdigest()[:20]
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        if not (directory / _SOURCE_FILE).is_file():  # each split opens the set: written once
            atomic_write(directory / _SOURCE_FILE, spec + "\n")
        path = urlparse(spec).path if not spec.startswith("pipe:") else ""
        if path.endswith(".json") or path.endswith("/"):
            return str(_fetch_manifest_set(spec, directory)), _name(path)
        return _fetch_pattern(spec, directory), _name(path or spec)


def _fetch_manifest_set(spec: str, directory: Path) -> Path:
    """A shard set by its manifest's address: each shard fetched beside the manifest's address,
    its size and SHA-256 checked; the manifest is written last, once every shard is kept."""
    if (directory / MANIFEST).is_file():
        return directory  # complete: every shard was checked when it was kept
    address = spec if spec.endswith(".json") else urljoin(spec, MANIFEST)
    fetched = directory / f".{MANIFEST}.fetched"
    try:
        _fetch(address, fetched, MAX_MANIFEST_BYTES)
        try:
            manifest = read_manifest(fetched)
        except DatasetError as e:
            raise DatasetError(printable(f"{address}: {str(e).split(': ', 1)[-1]}")) from None
        entries = [s for s in manifest["shards"] if not _kept(directory, s)]
        _check_space(directory, sum(s["bytes"] for s in entries))
        with _bar(sum(s["bytes"] for s in entries), spec) as bar:
            for s in entries:
                _fetch(urljoin(address, s["file"]), directory / s["file"], s["bytes"], s, bar)
        fetched.replace(directory / MANIFEST)
    finally:
        fetched.unlink(missing_ok=True)
    return directory


def _kept(directory: Path, entry: dict[str, Any]) -> bool:
    """Whether a shard was kept by an earlier, interrupted fetch of the set (and is still the
    one the manifest names)."""
    path = directory / entry["file"]
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        return False
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() == entry["sha256"]


def _fetch_pattern(spec: str, directory: Path) -> str:
    """Shards by addresses alone (a brace pattern of them): each bounded by `MAX_SHARD_BYTES`
    and the free space, kept as `shards-NNNNNN.tar` in the pattern's order."""
    addresses = list(islice(braceexpand(spec), MAX_SHARDS + 1))
    if len(addresses) > MAX_SHARDS:
        raise DatasetError(printable(f"{spec}: more than {MAX_SHARDS:,} shards")[:200])
    with _bar(None, spec) as bar:
        for i, address in enumerate(addresses):
            path = directory / SHARD_NAME.format(i)
            if not path.is_file():
                _fetch(address, path, MAX_SHARD_BYTES, None, bar)
    last = len(addresses) - 1
    return str(directory / SHARD_NAME.replace("{:06d}", f"{{{0:06d}..{last:06d}}}"))


def _fetch(
    address: str,
    path: Path,
    limit: int,
    entry: dict[str, Any] | None = None,
    bar: tqdm | None = None,
) -> None:
    """`address`'s bytes into `path`, kept only whole: at most `limit` bytes (exactly the
    manifest `entry`'s, with its SHA-256), leaving `DISK_MARGIN` free."""
    from webdataset.gopen import gopen  # the stream opener for every scheme it knows

    where = printable(address)
    room = shutil.disk_usage(path.parent).free - DISK_MARGIN
    try:
        stream = gopen(address, "rb")
        try:
            with atomic_file(path) as out:
                size, digest = _copy(stream, out, min(limit, room), bar)
                stream.close()  # a command's exit status, before its output is kept
                problem = _problem(size, digest, limit, room, entry)
                if problem is not None:
                    raise DatasetError(f"{where}: {problem}; not kept")
        except BaseException:
            _abandon(stream)
            raise
    except OSError as e:  # the command or curl failed (its exit status), or the disk did
        raise DatasetError(f"{where}: cannot fetch: {' '.join(str(e).split())[:300]}") from None


def _copy(stream: BinaryIO, out: BinaryIO, limit: int, bar: tqdm | None) -> tuple[int, str]:
    """Up to `limit` + 1 bytes of `stream` into `out`: how many, and their SHA-256."""
    digest, size = hashlib.sha256(), 0
    while size <= limit and (chunk := stream.read(min(_CHUNK, limit + 1 - size))):
        size += len(chunk)
        digest.update(chunk)
        out.write(chunk)
        if bar is not None:
            bar.update(len(chunk))
    return size, digest.hexdigest()


def _problem(
    size: int, digest: str, limit: int, room: int, entry: dict[str, Any] | None
) -> str | None:
    if size > room and room < limit:
        return f"the cache's disk would have less than {format_bytes(DISK_MARGIN)} free"
    if size > limit:
        return f"larger than {'its manifest says' if entry else format_bytes(limit)}"
    if entry is not None and size != entry["bytes"]:
        return f"{size:,} bytes, its manifest says {entry['bytes']:,}"
    if entry is not None and digest != entry["sha256"]:
        return "its SHA-256 differs from its manifest's"
    return "nothing came back" if size == 0 else None


def _abandon(stream: BinaryIO) -> None:
    """Stop a fetch half-way: its command (if any) killed, its errors no longer news."""
    proc = getattr(stream, "proc", None)
    if proc is not None:
        proc.kill()
    with contextlib.suppress(Exception):
        stream.close()


def _check_scheme(spec: str) -> None:
    from webdataset.gopen import gopen_schemes

    if spec.startswith("pipe:"):
        return
    scheme = urlparse(spec).scheme
    if scheme not in gopen_schemes or scheme == "__default__":
        hint = f"pipe:aws s3 cp {spec} -" if scheme == "s3" else f"pipe:COMMAND printing {spec}"
        raise DatasetError(
            printable(
                f"{spec}: {scheme}:// is not fetched directly; give the command that "
                f"prints it, e.g. '{hint}'"
            )
        )


def _check_space(directory: Path, need: int) -> None:
    free = shutil.disk_usage(directory).free
    if need > free - DISK_MARGIN:
        raise DatasetError(
            f"{directory}: the shards need {format_bytes(need)}, the disk has "
            f"{format_bytes(free)} free; set VITKIT_CACHE to a larger one"
        )


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One fetch of a set at a time: a second process waits, then finds the shards kept."""
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _bar(total: int | None, spec: str) -> tqdm:
    """Bytes fetched; shown unless the set is known to be small."""
    small = total is not None and total < _PROGRESS_MIN_BYTES
    return tqdm(
        total=total, desc=f"fetching {_name(spec)}", unit="B", unit_scale=True, disable=small
    )


def _name(path: str) -> str:
    """A set's name from its address: the manifest's folder, or the pattern's stem."""
    parts = [p for p in path.split("/") if p]
    if path.endswith((".json", "/")) and len(parts) > 1:
        return parts[-2] if path.endswith(".json") else parts[-1]
    stem = parts[-1] if parts else path
    return printable(stem.split("-{")[0].split(".")[0])[:80] or "shards"
