"""Search: the images of an embeddings file (`vitkit embed`) most like a query, by cosine
similarity of their embeddings.

    index = load_index("photos.safetensors")            or a folder of such files
    similarities, rows = search(index.features, query, k=10)
    [index.names[i] for i in rows]

An embeddings file is read as an attacker's: its header and names are bounded, its tensor's
dtype, shape and extent checked before anything is read, and every problem is one
`IndexFileError` naming the file. The query is embedded by the caller (the model the file
names: `embed_images` for an image, `embed_texts` for a CLIP's text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from vitkit.data.folder import printable
from vitkit.data.preprocess import open_regular
from vitkit.infer.embed import (
    EMBEDDING,
    EMBEDDINGS,
    FEATURES,
    FINGERPRINT,
    MODEL,
    MODEL_DIR,
    NAMES,
    POOLED,
)
from vitkit.infer.knn import nearest
from vitkit.weights.format import raw_header

__all__ = [
    "Index",
    "IndexFileError",
    "Match",
    "load_index",
    "read_index_file",
    "search",
    "top_matches",
]

# safetensors' own cap on a header; the names of the images live in it.
MAX_HEADER_BYTES = 100_000_000
# The most image rows, and numbers, an index may hold (4 GiB of float32), over all its files.
MAX_ROWS = 10_000_000
MAX_NUMBERS = 2**30
MAX_DIM = 65_536
# A folder index reads at most this many files.
MAX_FILES = 1_000
MAX_NAME_CHARS = 4_096  # a path; longer ones are not file names
# safetensors' names of the dtypes features may have, and their sizes in bytes.
FLOAT_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
SUFFIX = ".safetensors"


class IndexFileError(ValueError):
    """An embeddings file that is missing, malformed, too large, or not like its siblings."""


@dataclass
class Index:
    """Image embeddings (N, D) float32 and the images' names (row i: names[i]), with the model
        that embedded them and how (`embedding`: POOLED or CLIP_SPACE), and the files it was read
    from."""

    features: torch.Tensor
    names: list[str]
    model_dir: str | None
    embedding: str
    fingerprint: str | None = None  # `model_fingerprint` of that model, if recorded
    files: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Match:
    """One image of an index: its rank (1 first), name, row and cosine similarity."""

    rank: int
    name: str
    row: int
    similarity: float


def search(
    index_embeddings: torch.Tensor, query_embedding: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosine similarities of the `k` index rows (N, D) nearest `query_embedding` (D,)
    or each of several (Q, D), largest first, and those rows' indices: shapes (k,) or (Q, k).

    k beyond the index's size gives every row. Neither side needs unit length; memory stays
    bounded for any number of queries (`knn.nearest`).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if index_embeddings.ndim != 2 or len(index_embeddings) == 0:
        raise ValueError(f"expected index embeddings (N, D), got {tuple(index_embeddings.shape)}")
    single = query_embedding.ndim == 1
    queries = query_embedding[None] if single else query_embedding
    if queries.ndim != 2 or queries.shape[1] != index_embeddings.shape[1]:
        raise ValueError(
            f"a query of shape {tuple(query_embedding.shape)} for an index of "
            f"{index_embeddings.shape[1]}-dimensional embeddings"
        )
    bank = index_embeddings.float()
    similarities, indices = nearest(bank, queries.float(), min(k, len(bank)))
    return (similarities[0], indices[0]) if single else (similarities, indices)


def top_matches(index: Index, query_embedding: torch.Tensor, k: int) -> list[Match]:
    """`search` of one query (D,) over `index`, as named matches."""
    if query_embedding.ndim != 1:
        raise ValueError(f"expected one query embedding (D,), got {tuple(query_embedding.shape)}")
    similarities, rows = search(index.features, query_embedding, k)
    return [
        Match(rank, index.names[row], row, sim)
        for rank, (sim, row) in enumerate(zip(similarities.tolist(), rows.tolist(), strict=True), 1)
    ]


def load_index(path: str | Path) -> Index:
    """An embeddings file, or a folder of them (each `*.safetensors` directly in it, read in
    name order and searched as one: they must come from one model, embedded alike)."""
    path = Path(path)
    if not path.is_dir():
        return read_index_file(path)
    files = sorted(p for p in path.iterdir() if p.name.endswith(SUFFIX) and p.is_file())
    name = printable(str(path))
    if not files:
        raise IndexFileError(f"{name}: no {SUFFIX} embeddings files in this folder")
    if len(files) > MAX_FILES:
        raise IndexFileError(f"{name}: {len(files):,} embeddings files, more than {MAX_FILES:,}")
    parts: list[Index] = []
    rows = numbers = 0
    for file in files:
        part = read_index_file(file, MAX_ROWS - rows, MAX_NUMBERS - numbers)
        first = parts[0] if parts else part
        for what, mine, theirs in (
            ("model", part.model_dir, first.model_dir),
            ("model's fingerprint", part.fingerprint, first.fingerprint),
            ("kind of embeddings", part.embedding, first.embedding),
            ("embedding size", part.features.shape[1], first.features.shape[1]),
        ):
            if mine != theirs:
                raise IndexFileError(
                    f"{printable(str(file))}: its {what} ({printable(str(mine))}) is not that of "
                    f"{printable(str(files[0]))} ({printable(str(theirs))}); a folder index holds "
                    "one model's embeddings"
                )
        parts.append(part)
        rows += len(part)
        numbers += part.features.numel()
    return Index(
        features=torch.cat([p.features for p in parts]),
        names=[n for p in parts for n in p.names],
        model_dir=parts[0].model_dir,
        embedding=parts[0].embedding,
        fingerprint=parts[0].fingerprint,
        files=files,
    )


def read_index_file(
    path: str | Path, max_rows: int = MAX_ROWS, max_numbers: int = MAX_NUMBERS
) -> Index:
    """One embeddings file written by `vitkit embed`, checked (see the module's docstring);
    `max_rows` and `max_numbers` bound its features (what a folder's earlier files left)."""
    path = Path(path)
    name = printable(str(path))
    try:
        header, size = _read_header(path)
    except (OSError, ValueError, RecursionError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise IndexFileError(f"{name}: not a readable embeddings file: {_one_line(why)}") from None
    try:
        metadata = _metadata(header)
        entry = header.get(FEATURES)
        if entry is None:
            raise ValueError(f"no {FEATURES!r} tensor (no images were embedded into it)")
        n, d, dtype = _features_entry(entry, size, max_rows, max_numbers)
        names = _names(metadata.get(NAMES), n)
        embedding = metadata.get(EMBEDDING, POOLED)  # files before the entry: pooled features
        if embedding not in EMBEDDINGS:
            raise ValueError(
                f"metadata {EMBEDDING!r} is {embedding[:40]!r}, not one of {EMBEDDINGS}"
            )
        model_dir = metadata.get(MODEL_DIR) or metadata.get(MODEL)
        if model_dir is not None and (len(model_dir) > MAX_NAME_CHARS or "\0" in model_dir):
            raise ValueError(f"metadata {MODEL_DIR!r} is not a directory name")
        fingerprint = metadata.get(FINGERPRINT)
        if fingerprint is not None and not (
            len(fingerprint) <= 128 and fingerprint.isascii() and fingerprint.isalnum()
        ):
            raise ValueError(f"metadata {FINGERPRINT!r} is not a digest")
    except ValueError as e:
        raise IndexFileError(f"{name}: {_one_line(str(e))}") from None
    try:
        with safe_open(path, framework="pt") as f:
            features = f.get_tensor(FEATURES)
    except (SafetensorError, OSError, ValueError) as e:
        raise IndexFileError(
            f"{name}: not a readable safetensors file (corrupt or truncated?): {_one_line(str(e))}"
        ) from None
    if tuple(features.shape) != (n, d) or features.dtype != dtype:  # as its header said
        raise IndexFileError(f"{name}: {FEATURES!r} read back unlike its header")
    features = features.float()
    if not torch.isfinite(features).all():
        raise IndexFileError(f"{name}: {FEATURES!r} holds NaN or infinite numbers")
    return Index(features, names, model_dir, embedding, fingerprint, [path])


_TORCH_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (bounded), and the size of its data part."""
    with open_regular(path) as f:  # a FIFO would block, a device never end
        return raw_header(f, MAX_HEADER_BYTES)


def _metadata(header: dict[str, Any]) -> dict[str, str]:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("its metadata is not a JSON object of strings")
    return metadata


def _features_entry(
    entry: Any, data_bytes: int, max_rows: int, max_numbers: int
) -> tuple[int, int, torch.dtype]:
    """Rows, dimensions and dtype of the features tensor, its extent inside the file."""
    if not isinstance(entry, dict):
        raise ValueError(f"{FEATURES!r}: not a tensor entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in FLOAT_SIZES:
        raise ValueError(f"{FEATURES!r} is {str(dtype)[:20]}, not floating-point")
    if not (_ints(shape) and len(shape) == 2):
        raise ValueError(f"{FEATURES!r} must be a matrix (N, D), got shape {str(shape)[:60]}")
    n, d = shape
    if not 1 <= n <= max_rows:
        raise ValueError(f"{FEATURES!r} has {n:,} rows; an index holds 1 to {MAX_ROWS:,} in all")
    if not 1 <= d <= MAX_DIM:
        raise ValueError(f"{FEATURES!r} has {d:,} dimensions, not 1 to {MAX_DIM:,}")
    if n * d > max_numbers:
        raise ValueError(
            f"{FEATURES!r} holds {n * d:,} numbers; an index holds at most {MAX_NUMBERS:,} in all"
        )
    if not (_ints(offsets) and len(offsets) == 2):
        raise ValueError(f"{FEATURES!r}: malformed data_offsets")
    start, end = offsets
    if end - start != n * d * FLOAT_SIZES[dtype] or end > data_bytes:
        raise ValueError(
            f"{FEATURES!r}: its data ({start:,} to {end:,}) is not {n:,} x {d:,} {dtype} inside "
            f"the file's {data_bytes:,} bytes"
        )
    return n, d, _TORCH_DTYPES[dtype]


def _names(value: str | None, n: int) -> list[str]:
    if value is None:
        raise ValueError(f"no {NAMES!r} metadata (the images' names)")
    try:
        names = json.loads(value)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"metadata {NAMES!r} is not valid JSON: {e}") from None
    if not isinstance(names, list) or len(names) != n:
        got = f"{len(names):,} entries" if isinstance(names, list) else type(names).__name__
        raise ValueError(f"metadata {NAMES!r} must list the {n:,} images' names, got {got}")
    for entry in names:
        if not isinstance(entry, str) or len(entry) > MAX_NAME_CHARS:
            raise ValueError(f"metadata {NAMES!r}: {str(entry)[:40]!r} is not a file name")
    return names


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _one_line(text: str) -> str:
    return printable(" ".join(text.split()))
