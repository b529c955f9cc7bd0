"""Hugging Face `datasets` as image sources: a folder written by `save_to_disk`, Parquet files,
or a dataset on the Hub (`hf:owner/name`, downloaded by `datasets` into its cache).

    source = open_hf("cifar10-saved/", "train")
    stream = ImageStream(source, image_size=224, channels=3)

The image column is the first `datasets.Image` one and the label column the first
`ClassLabel` (else one called `label` or `labels`), unless named. Images are read as their
encoded bytes, straight from the memory-mapped Arrow data, and decoded by the stream's
workers; the labels are read once, a column at a time. `datasets` is imported only here, and
only when a dataset is opened: it is slow to import and an optional dependency.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vitkit.data.dataset import DatasetError
from vitkit.data.folder import printable
from vitkit.data.manifest import MAX_CLASSES, MAX_LABEL_CHARS, MAX_ROWS, sort_classes
from vitkit.data.preprocess import UnreadableImage
from vitkit.data.stream import Source, split_source

# The largest encoded image read, as for a tar shard's member.
MAX_IMAGE_BYTES = 64 << 20
HUB_PREFIX = "hf:"
# The held-out split each request prefers, in order.
_HELD_OUT = {"val": ("validation", "val", "test"), "test": ("test", "validation", "val")}
_LABEL_NAMES = ("label", "labels")
# What `save_to_disk` writes beside the data: a DatasetDict's, and a Dataset's.
SAVED_FILES = ("dataset_dict.json", "state.json", "dataset_info.json")


@dataclass
class HFSource:
    """The images and labels of one split of a Hugging Face dataset."""

    rows: Any  # a datasets.Dataset of the image column alone, formatted as Arrow tables
    labels: list[int]
    classes: list[str]
    name: str
    where: str  # names the split in messages: "name[split]"

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> Path | BinaryIO:
        """Row `i`'s encoded image (bytes in memory, named `where[i]`) or, where the dataset
        holds only a path, that file."""
        what = f"{self.where}[{i}]"
        cell = self.rows[i].column(0)[0]  # a struct {bytes, path}, not copied yet
        data = cell["bytes"] if cell.is_valid else None
        if data is not None and data.is_valid:
            buffer = data.as_buffer()
            if buffer.size > MAX_IMAGE_BYTES:
                raise UnreadableImage(
                    what, f"{buffer.size:,} bytes, over the limit of {MAX_IMAGE_BYTES >> 20} MiB"
                )
            f = io.BytesIO(buffer)
            f.name = what
            return f
        path = cell["path"] if cell.is_valid else None
        if path is not None and path.is_valid:
            return Path(path.as_py())
        raise UnreadableImage(what, "no image in this row")


def open_hf(
    spec: str | Path,
    split: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Source:
    """Split `split` ("train", "val", "test" or "all") of the dataset `spec`: a `save_to_disk`
    folder, a .parquet file, a folder or glob of them, or `hf:owner/name` on the Hub.

    Data with a "train" split and a held-out one ("validation", "val" or "test") is split by
    them: "val" and "test" each prefer their own and fall back on the other. A single dataset
    is split by `val_fraction` and `seed` as `split_source` splits ("test" is "val").
    """
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split must be 'train', 'val', 'test' or 'all', not {split!r}")
    datasets = _import_datasets()
    where = printable(str(spec))
    loaded, name = _load(datasets, spec, where)
    data, part, subset = _pick_split(datasets, loaded, split, where)
    where = f"{printable(name)}[{part}]" if part else printable(name)
    if len(data) == 0:
        raise DatasetError(f"{where}: no rows")
    if len(data) > MAX_ROWS:
        raise DatasetError(f"{where}: {len(data):,} rows, more than {MAX_ROWS:,}")
    image, label = _columns(datasets, data, image_column, label_column, where)
    classes, labels = _labels(datasets, data, label, where)
    rows = data.select_columns([image]).with_format("arrow")
    source = HFSource(rows, labels, classes, name, where)
    return split_source(source, subset, val_fraction, seed)


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            "reading Hugging Face datasets needs the `datasets` package: pip install 'vitkit[hf]'"
        ) from None
    return datasets


def _load(datasets: Any, spec: str | Path, where: str) -> tuple[Any, str]:
    """The Dataset or DatasetDict `spec` names, and its name."""
    text = str(spec)
    if isinstance(spec, str) and text.startswith(HUB_PREFIX):
        hub = text[len(HUB_PREFIX) :]
        return _call(lambda: datasets.load_dataset(hub), where), hub
    path = Path(spec)
    if path.is_dir():
        if any((path / f).is_file() for f in SAVED_FILES):
            return _call(lambda: datasets.load_from_disk(str(path)), where), path.name
        if not any(path.rglob("*.parquet")):
            raise DatasetError(
                f"{where}: neither a dataset saved by save_to_disk nor a folder of .parquet files"
            )
        # The file names say the splits, as on the Hub: train-*.parquet, test-*.parquet, ...
        load = lambda: datasets.load_dataset("parquet", data_dir=str(path))  # noqa: E731
        return _call(load, where), path.name
    if path.suffix == ".parquet" and path.is_file():
        load = lambda: datasets.load_dataset("parquet", data_files=str(path))  # noqa: E731
        return _call(load, where), path.stem
    if any(c in text for c in "*?["):
        load = lambda: datasets.load_dataset("parquet", data_files=text)  # noqa: E731
        return _call(load, where), path.parent.name
    raise DatasetError(
        f"{where}: not a saved dataset, a .parquet file, a folder or glob of them, "
        f"or {HUB_PREFIX}owner/name"
    )


def _call(load: Any, where: str) -> Any:
    try:
        return load()
    # `datasets` raises many types for files missing, malformed or not found on the Hub.
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetError(printable(f"{where}: cannot load: {reason}")) from None


def _pick_split(datasets: Any, loaded: Any, split: str, where: str) -> tuple[Any, str, str]:
    """(dataset, its split's name or "", the `split_source` subset of it to keep)."""
    subset = "val" if split == "test" else split
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded, str(loaded.split or ""), subset
    names = list(loaded)
    held_out = [s for s in ("validation", "val", "test") if s in loaded]
    if "train" in loaded and held_out:
        if split == "all":
            raise DatasetError(
                f"{where}: has splits {', '.join(names)}; ask for train, val or test"
            )
        part = "train" if split == "train" else next(s for s in _HELD_OUT[split] if s in loaded)
        return loaded[part], part, "all"
    if "train" in loaded or len(names) == 1:
        part = "train" if "train" in loaded else names[0]
        return loaded[part], part, subset
    raise DatasetError(
        printable(f"{where}: splits {', '.join(names)}, none of them called 'train'")
    )


def _columns(
    datasets: Any, data: Any, image: str | None, label: str | None, where: str
) -> tuple[str, str]:
    """The image and label columns: the ones named, checked, or the first of their types."""
    features = data.features
    listing = printable(", ".join(f"{k} ({_kind(datasets, v)})" for k, v in features.items()))
    listing = listing if len(listing) <= 400 else listing[:397] + "..."  # one line still
    if image is None:
        image = next((k for k, v in features.items() if _is_image(datasets, v)), None)
        if image is None:
            raise DatasetError(f"{where}: no image column; its columns: {listing}")
    elif image not in features or not _is_image(datasets, features[image]):
        problem = "is not an image column" if image in features else "does not exist"
        raise DatasetError(
            printable(f"{where}: column {image!r} {problem}; its columns: ") + listing
        )
    if label is None:
        label = next((k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None)
        label = label or next((k for k in _LABEL_NAMES if k in features), None)
        if label is None:
            raise DatasetError(f"{where}: no label column; its columns: {listing}")
    if label not in features or not _is_label(datasets, features[label]):
        problem = "is not a label column" if label in features else "does not exist"
        raise DatasetError(
            printable(f"{where}: column {label!r} {problem}; its columns: ") + listing
        )
    return image, label


def _is_image(datasets: Any, feature: Any) -> bool:
    # Parquet written by other tools than `datasets` holds images as this struct, unlabelled.
    return isinstance(feature, datasets.Image) or (
        isinstance(feature, dict)
        and set(feature) == {"bytes", "path"}
        and all(isinstance(v, datasets.Value) for v in feature.values())
    )


def _is_label(datasets: Any, feature: Any) -> bool:
    """A ClassLabel, or integers or strings."""
    if isinstance(feature, datasets.ClassLabel):
        return True
    dtype = getattr(feature, "dtype", "") if isinstance(feature, datasets.Value) else ""
    return dtype.startswith(("int", "uint")) or dtype in ("string", "large_string")


def _kind(datasets: Any, feature: Any) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return f"ClassLabel, {feature.num_classes} classes"
    if isinstance(feature, datasets.Value):
        return feature.dtype
    return "image" if _is_image(datasets, feature) else type(feature).__name__


def _labels(datasets: Any, data: Any, column: str, where: str) -> tuple[list[str], list[int]]:
    """The classes and every row's label, read column-wise."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = data.with_format("arrow")[column]
    feature = data.features[column]
    if isinstance(feature, datasets.ClassLabel):
        classes = [str(c) for c in feature.names]
        if len(classes) > MAX_CLASSES:
            raise DatasetError(f"{where}: {len(classes):,} classes, more than {MAX_CLASSES:,}")
        # -1 (or null) is how `datasets` marks an unlabelled row, e.g. of a hidden test set.
        bad = pc.or_kleene(pc.less(values, 0), pc.greater_equal(values, len(classes)))
        _refuse_rows(pc.fill_null(bad, True), where, f"{column!r} is not one of the classes")
        return classes, values.to_pylist()
    values = pc.cast(values, pa.large_string())  # 64-bit offsets: any column fits
    _refuse_rows(pc.is_null(values), where, f"no label in {column!r}")
    lengths = pc.utf8_length(values)
    _refuse_rows(
        pc.or_(pc.equal(lengths, 0), pc.greater(lengths, MAX_LABEL_CHARS)),
        where,
        f"the label in {column!r} is empty or longer than {MAX_LABEL_CHARS} characters",
    )
    names = pc.unique(values)
    if len(names) > MAX_CLASSES:
        raise DatasetError(f"{where}: {len(names):,} classes, more than {MAX_CLASSES:,}")
    classes = sort_classes(names.to_pylist())
    return classes, pc.index_in(values, value_set=pa.array(classes, pa.large_string())).to_pylist()


def _refuse_rows(bad: Any, where: str, problem: str) -> None:
    """A DatasetError naming the first row where `bad` (a boolean array) is true, if any."""
    import pyarrow.compute as pc

    first = pc.index(bad, True).as_py()
    if first >= 0:
        raise DatasetError(printable(f"{where}[{first}]: {problem}"))
