"""Image collections listed in a manifest: a CSV file with `path` and `label` columns (others
are ignored), or JSON lines of {"path": ..., "label": ...}; the paths are relative to the
manifest's folder and the labels are class names. Hugging Face's imagefolder metadata reads
the same: `file_name` for the path, `label` or `labels` (or a column named) for the label.

    source = ManifestSource.open("photos/train.csv")
    source = ManifestSource.open("photos/metadata.jsonl", label_column="species")
    stream = ImageStream(source, image_size=224, channels=3)

`metadata_file` finds such a metadata file (`metadata.csv` or `metadata.jsonl`) in a folder.

The image files are not looked at when the manifest is read (a collection may hold millions of
them): an unreadable one is passed over when the stream reaches it. A manifest is attacker
input: it is bounded before it is read, a path that is absolute or leads out of the manifest's
folder is refused, and so is any malformed row, in one line naming the manifest and the line.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vitkit.data.dataset import DatasetError
from vitkit.data.folder import printable
from vitkit.data.preprocess import open_regular

MAX_MANIFEST_BYTES = 4 << 30
# One row's bytes: a CSV row may span lines inside quotes, and all of them count.
MAX_ROW_BYTES = 64 << 10
# ImageNet-21k is 14 million images; each row costs some 100 bytes of memory here.
MAX_ROWS = 50_000_000
MAX_CLASSES = 1_000_000
MAX_LABEL_CHARS = 256
MAX_PATH_CHARS = 4096  # Linux's PATH_MAX
CSV_SUFFIXES = (".csv",)
JSON_LINES_SUFFIXES = (".jsonl", ".json-lines", ".ndjson")
# Hugging Face's imagefolder: a folder's images described by one of these beside them.
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
# The path column by its names, in the order preferred: Hugging Face's `file_name` is the
# image's path by definition, where a `path` column beside it may hold anything.
PATH_COLUMNS = ("file_name", "path")
LABEL_COLUMNS = ("label", "labels")
# ASCII digits only: str.isdigit also takes other scripts' digits, which int() then reads.
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass
class ManifestSource:
    """The image files a manifest lists and their labels."""

    root: Path  # the manifest's folder
    paths: list[str]  # normalised, relative to `root`
    labels: list[int]
    classes: list[str]
    name: str

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        classes: Sequence[str] | None = None,
        label_column: str | None = None,
    ) -> ManifestSource:
        """The rows of the manifest at `path` (.csv, .jsonl, .json-lines or .ndjson), bounded
        and checked. The classes are its labels, sorted (as numbers if all are integers);
        `classes` gives them instead (e.g. a training manifest's, for a validation one).
        The labels are in `label_column`, else in `label` or `labels`."""
        path = Path(path)
        where = printable(str(path))
        suffix = path.suffix.lower()
        if suffix not in CSV_SUFFIXES + JSON_LINES_SUFFIXES:
            kinds = ", ".join(CSV_SUFFIXES + JSON_LINES_SUFFIXES)
            raise DatasetError(f"{where}: not a manifest by its name (expected {kinds})")
        try:
            f = open_regular(path)
        except OSError as e:
            raise DatasetError(f"{where}: cannot read: {e.strerror or e}") from None
        with f:
            if os.fstat(f.fileno()).st_size > MAX_MANIFEST_BYTES:
                raise DatasetError(f"{where}: larger than {MAX_MANIFEST_BYTES >> 30} GiB")
            lines = _Lines(f, where)
            labels = (label_column,) if label_column else LABEL_COLUMNS
            read = _csv_rows if suffix in CSV_SUFFIXES else _json_rows
            rows = read(lines, labels)
            try:
                paths, found, seen = _check_rows(rows, where)
            except csv.Error as e:
                raise DatasetError(printable(f"{where}: line {lines.number}: {e}")) from None
        if not paths:
            raise DatasetError(f"{where}: no rows")
        classes = sort_classes(seen) if classes is None else list(classes)
        index = {c: i for i, c in enumerate(classes)}
        unknown = next((n for n in seen if n not in index), None)
        if unknown is not None:
            raise DatasetError(
                f"{where}: label {_show(unknown)} is not among the {len(classes)} classes given"
            )
        order = [index[n] for n in seen]
        labels = [order[k] for k in found]
        return cls(path.parent.absolute(), paths, labels, classes, path.stem)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> Path:
        return self.root / self.paths[i]


def metadata_file(folder: Path) -> Path | None:
    """The Hugging Face imagefolder metadata file in `folder`, if it has one."""
    found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(found) > 1:
        raise DatasetError(
            printable(f"{folder}: both {' and '.join(METADATA_FILES)}; keep one of them")
        )
    return found[0] if found else None


def sort_classes(names: Iterable[str]) -> list[str]:
    """Class names in order: as numbers if every one is an integer ("2" before "10"), else as
    strings."""
    names = list(names)
    if names and all(_INTEGER.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


class _Lines:
    """The lines of a UTF-8 text file, each row's bounded by MAX_ROW_BYTES bytes (a row ends at
    `next_row`) and all of them by MAX_MANIFEST_BYTES, should the file grow while it is read.
    Lines are decoded one at a time, so that an error names its line."""

    def __init__(self, f: BinaryIO, where: str) -> None:
        self.f, self.where = f, where
        self.number = 0  # of the last line read
        self._row = self._total = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = self.f.readline(MAX_ROW_BYTES - self._row + 1)
        if not line:
            raise StopIteration
        self.number += 1
        self._row += len(line)
        self._total += len(line)
        if self._row > MAX_ROW_BYTES:
            raise DatasetError(
                f"{self.where}: line {self.number}: a row longer than {MAX_ROW_BYTES:,} bytes"
            )
        if self._total > MAX_MANIFEST_BYTES:
            raise DatasetError(f"{self.where}: larger than {MAX_MANIFEST_BYTES >> 30} GiB")
        if self.number == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]  # as spreadsheets often start a CSV file
        try:
            return line.decode()
        except UnicodeDecodeError:
            raise DatasetError(f"{self.where}: line {self.number}: not UTF-8 text") from None

    def next_row(self) -> None:
        self._row = 0


def _csv_rows(lines: _Lines, labels: Sequence[str]) -> Iterator[tuple[int, Any, Any]]:
    """(line number, path, label) of each row of a CSV manifest, its label from the first
    column of `labels` it has."""
    # skipinitialspace: "path, label" as people write it by hand.
    reader = csv.reader(lines, skipinitialspace=True)
    header = next(reader, None)
    lines.next_row()
    if header is None:
        raise DatasetError(f"{lines.where}: empty")
    columns = [name.strip() for name in header]
    keys = []
    for names in (PATH_COLUMNS, labels):
        key = next((name for name in names if name in columns), None)
        if key is None:
            raise DatasetError(
                f"{lines.where}: line {lines.number}: {_absent(names, 'column')} in the header "
                f"(its columns: {_show(', '.join(columns))})"
            )
        keys.append(key)
    p, q = (columns.index(key) for key in keys)
    for row in reader:
        lines.next_row()
        if not row:  # a blank line
            continue
        if len(row) <= max(p, q):
            raise DatasetError(
                f"{lines.where}: line {lines.number}: {len(row)} fields, expected {len(columns)}"
            )
        yield lines.number, row[p], row[q]


def _json_rows(lines: _Lines, labels: Sequence[str]) -> Iterator[tuple[int, Any, Any]]:
    """(line number, path, label) of each object of a JSON-lines manifest, its label from the
    first key of `labels` it has."""
    for text in lines:
        lines.next_row()
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        # ValueError: malformed, or an integer of more digits than Python converts.
        except (ValueError, RecursionError) as e:
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise DatasetError(
                printable(f"{lines.where}: line {lines.number}: not valid JSON: {reason}")
            ) from None
        if not isinstance(row, dict):
            raise DatasetError(f"{lines.where}: line {lines.number}: not a JSON object")
        keys = []
        for names in (PATH_COLUMNS, labels):
            key = next((name for name in names if name in row), None)
            if key is None:
                raise DatasetError(
                    f"{lines.where}: line {lines.number}: {_absent(names, 'key')} "
                    f"(its keys: {_show(', '.join(row))})"
                )
            keys.append(key)
        yield lines.number, row[keys[0]], row[keys[1]]


def _check_rows(
    rows: Iterable[tuple[int, Any, Any]], where: str
) -> tuple[list[str], list[int], list[str]]:
    """The rows' normalised paths, their labels as indices into the class names in the order
    first met, and those names; each row checked, at most MAX_ROWS rows and MAX_CLASSES
    classes."""
    paths: list[str] = []
    labels: list[int] = []
    seen: dict[str, int] = {}
    for line, path, label in rows:
        problem = _path_problem(path) or _label_problem(label)
        if problem is None and len(paths) >= MAX_ROWS:
            problem = f"more than {MAX_ROWS:,} rows"
        name = str(label) if problem is None else ""
        if problem is None and name not in seen and len(seen) >= MAX_CLASSES:
            problem = f"more than {MAX_CLASSES:,} classes"
        if problem is not None:
            raise DatasetError(f"{where}: line {line}: {problem}")
        paths.append(os.path.normpath(path))
        labels.append(seen.setdefault(name, len(seen)))
    return paths, labels, list(seen)


def _path_problem(path: Any) -> str | None:
    if not isinstance(path, str):
        return f"the path {_show(path)} is not a string"
    if not path or len(path) > MAX_PATH_CHARS or "\0" in path:
        return f"the path {_show(path)} is not a file name (empty, too long or with a NUL)"
    if os.path.isabs(path):
        return f"the path {_show(path)} is absolute; paths are relative to the manifest"
    # Lexical: the files are not looked at here, and ".." is resolved as the kernel would
    # only where no symbolic link precedes it; a file read later may still be a link.
    normal = os.path.normpath(path)
    if normal == os.curdir:
        return f"the path {_show(path)} names the manifest's folder, not a file"
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        return f"the path {_show(path)} leads out of the manifest's folder"
    return None


def _label_problem(label: Any) -> str | None:
    # JSON's true and false are ints to Python, but not class names.
    if isinstance(label, bool) or not isinstance(label, str | int):
        return f"the label {_show(label)} is not a string or an integer"
    # JSON integers have at most 4,300 digits (Python's limit), so str() is quick.
    name = str(label)
    if not name or len(name) > MAX_LABEL_CHARS:
        return f"the label {_show(name)} is empty or longer than {MAX_LABEL_CHARS} characters"
    return None


def _absent(names: Sequence[str], what: str) -> str:
    """Words for `names` not found, the usual one first: "no 'path' column (nor 'file_name')"."""
    usual = "path" if "path" in names else names[0]
    others = "".join(f" (nor {_show(n)})" for n in names if n != usual)
    return f"no {_show(usual)} {what}{others}"


def _show(value: Any) -> str:
    """`value` quoted for a message, printable and at most some 80 characters."""
    text = printable(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."
