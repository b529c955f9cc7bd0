"""vitkit's checkpoint format: a directory with config.json, model.safetensors, labels.json
and, for trained models, calibration.safetensors (sample images for int8 inference).

No pickle anywhere: weights are safetensors, metadata is JSON, every file is written
atomically (temporary file, then rename) so an interrupted save never leaves a torn file.
Every file read is treated as hostile: sizes are bounded and safetensors headers checked
against the config before any memory is spent on a model, and whatever goes wrong is one
CheckpointError that names the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from vitkit.config import MAX_PARAMS, SIZE_LIMITS, ViTConfig
from vitkit.files import atomic_write
from vitkit.model.vit import ViT, state_shapes
from vitkit.rundir import CALIBRATION_FILE, CONFIG_FILE, LABELS_FILE, WEIGHTS_FILE

# Names that mean a model shipped inside the package (see `shipped/`).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "shipped"

# The labels of a million classes fit in a JSON file this size.
MAX_JSON_BYTES = 64 * 2**20
# A safetensors header names each tensor in about 100 bytes; the deepest model vitkit builds
# has some 12,000 tensors.
MAX_HEADER_BYTES = 16 * 2**20
MAX_NAME_CHARS = 1000  # tensor names are echoed in error messages
# Training keeps at most 128 calibration images of about 8 MB in all (infer/optimize.py).
MAX_CALIBRATION_IMAGES = 1024
MAX_CALIBRATION_BYTES = 512 * 2**20
# safetensors' names of the dtypes weights may have; they load as float32.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model it claims to be."""


class TensorInfo(NamedTuple):
    """One tensor of a safetensors file, as its header describes it."""

    dtype: str
    shape: tuple[int, ...]


def one_line(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Turn whatever reading `path` raises (torch's RuntimeError on a misshapen tensor, an
    IndexError, ...) into one CheckpointError that names it."""
    try:
        yield
    except ValueError as e:  # CheckpointError included; most already name the file
        if str(path) in str(e):
            raise
        raise CheckpointError(f"{path}: {one_line(str(e))}") from e
    except Exception as e:
        raise CheckpointError(f"{path}: {type(e).__name__}: {one_line(str(e))}") from e


def save_model(model: ViT, directory: str | Path, labels: list[str] | None = None) -> Path:
    """Save `model` (and its labels, if any) as a vitkit model directory."""
    directory = Path(directory)
    labels = labels if labels is not None else model.labels
    _check_labels(labels, model.config.num_classes)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, save_safetensors(tensors, metadata={"format": "pt"}))
    # A previous model's labels or calibration images left in the directory would be read
    # as this model's.
    if labels is not None:
        atomic_write(directory / LABELS_FILE, json.dumps(labels, indent=1) + "\n")
    else:
        (directory / LABELS_FILE).unlink(missing_ok=True)
    if model.calibration is not None:
        images = {"images": model.calibration.cpu().contiguous()}
        atomic_write(directory / CALIBRATION_FILE, save_safetensors(images))
    else:
        (directory / CALIBRATION_FILE).unlink(missing_ok=True)
    atomic_write(directory / CONFIG_FILE, model.config.to_json())
    return directory


def resolve_model_dir(dir_or_name: str | Path) -> Path:
    """A model directory (or training run directory), or the name of a shipped model."""
    path = Path(dir_or_name)
    if not path.exists() and (SHIPPED_DIR / str(dir_or_name)).is_dir():
        path = SHIPPED_DIR / str(dir_or_name)
    if not path.is_dir():
        shipped = sorted(p.name for p in SHIPPED_DIR.iterdir()) if SHIPPED_DIR.is_dir() else []
        names = f" or a shipped model name ({', '.join(shipped)})" if shipped else ""
        raise CheckpointError(f"{dir_or_name}: not a model directory{names}")
    return path


def read_json(path: Path) -> Any:
    """A JSON file of bounded size."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size:,} bytes, more than {MAX_JSON_BYTES:,}")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; nesting too deep
        raise CheckpointError(f"{path}: not valid JSON: {one_line(str(e))}") from None


def load_config(directory: str | Path) -> ViTConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a model directory needs {CONFIG_FILE}")
    try:
        config = ViTConfig.from_dict(read_json(path))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config


def _model_shapes(config: ViTConfig, path: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of the model's tensors (read off a model on the meta device), refusing a
    config whose sizes, each within its bound, together make too many parameters."""
    shapes = state_shapes(config)
    params = sum(math.prod(shape) for shape in shapes.values())
    if params > MAX_PARAMS:
        raise CheckpointError(
            f"{path}: describes {params:,} parameters, more than the {MAX_PARAMS:,} vitkit "
            "builds (check width, depth, image_size and num_classes)"
        )
    return shapes


def load_model(dir_or_name: str | Path, image_size: int | None = None) -> ViT:
    """Load a model directory; `image_size` resamples position embeddings for a new size.

    Every file is checked (the weights against the config, by their header) before the
    model is built."""
    directory = resolve_model_dir(dir_or_name)
    with reading(directory):
        config = load_config(directory)
        shapes = _model_shapes(config, directory / CONFIG_FILE)
        weights = directory / WEIGHTS_FILE
        header = read_header(weights)
        check_weights(weights, header, shapes)
        labels = load_labels(directory, config.num_classes)
        calibration = _calibration_header(directory, config.in_channels)
        model = ViT(config)
        model.load_state_dict(read_tensors(weights, header))
        model.labels = labels
        if calibration is not None:
            model.calibration = read_tensors(calibration, ["images"])["images"]
    if image_size is not None:
        model.set_image_size(image_size)
    return model.eval()


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, from its header alone: a header of bounded size
    whose every tensor lies inside the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with path.open("rb") as f:
            header, data_bytes = raw_header(f)
        header.pop("__metadata__", None)
        out = {}
        for name, entry in header.items():
            if len(name) > MAX_NAME_CHARS:
                raise ValueError(f"a tensor name of {len(name):,} characters")
            if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)):
                raise ValueError(f"tensor {name!r}: no dtype")
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if not (_ints(shape) and _ints(offsets) and len(offsets) == 2):
                raise ValueError(f"tensor {name!r}: malformed shape or data_offsets")
            if offsets[1] > data_bytes:
                raise ValueError(
                    f"tensor {name!r}: its data ends at byte {offsets[1]:,}, past the end of "
                    f"the file's {data_bytes:,}"
                )
            out[name] = TensorInfo(entry["dtype"], tuple(shape))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (corrupt or truncated?): {one_line(str(e))}"
        ) from None
    return out


def raw_header(f: BinaryIO, limit: int = MAX_HEADER_BYTES) -> tuple[dict[str, Any], int]:
    """The JSON header of an open safetensors file, of at most `limit` bytes, and the size of
    the data part that follows it. Raises ValueError for what is no safetensors header."""
    size = os.fstat(f.fileno()).st_size
    length = int.from_bytes(f.read(8), "little")
    if size < 8 or length > min(limit, size - 8):
        raise ValueError(f"a header of {length:,} bytes in a file of {size:,}")
    header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, size - 8 - length


def _ints(value: object) -> bool:
    """A JSON list of non-negative integers."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def read_tensors(path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file whose header has been checked."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (corrupt or truncated?): {one_line(str(e))}"
        ) from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file from elsewhere: floating-point, and no more of them
    than the largest model vitkit builds."""
    header = read_header(path)
    check_float(path, header)
    total = sum(math.prod(t.shape) for t in header.values())
    if total > MAX_PARAMS:
        raise CheckpointError(
            f"{path}: {total:,} numbers, more than the {MAX_PARAMS:,} parameters vitkit builds"
        )
    return read_tensors(path, header)


def check_float(path: Path, header: Mapping[str, TensorInfo]) -> None:
    for name, info in header.items():
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} is {info.dtype}, not floating-point")


def check_weights(
    path: Path, header: Mapping[str, TensorInfo], expected: Mapping[str, tuple[int, ...]]
) -> None:
    """Refuse weights that are not the config's model, naming every tensor that differs."""
    problems = shape_problems({k: v.shape for k, v in header.items()}, expected)
    if problems:
        raise CheckpointError(f"{path} does not match its config.json: " + " | ".join(problems))
    check_float(path, header)


def shape_problems(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Missing, unexpected and misshapen tensors, each kind on its own (empty: a match)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(v)}"
        for k, v in expected.items()
        if k in found and tuple(found[k]) != tuple(v)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_first(missing, ', ')}")
    if unexpected:
        problems.append(f"unexpected tensors: {_first(unexpected, ', ')}")
    if wrong:
        problems.append(f"shape mismatches: {_first(wrong, '; ')}")
    return problems


def _first(items: list[str], sep: str, n: int = 8) -> str:
    more = f"{sep}and {len(items) - n} more" if len(items) > n else ""
    return sep.join(items[:n]) + more


def load_labels(directory: Path, num_classes: int) -> list[str] | None:
    path = directory / LABELS_FILE
    if not path.is_file():
        return None
    labels = read_json(path)
    try:
        _check_labels(labels, num_classes)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return labels


def _calibration_header(directory: Path, channels: int) -> Path | None:
    """The calibration file, if any, once its header shows a bounded uint8 (N, C, H, W)."""
    path = directory / CALIBRATION_FILE
    if not path.is_file():
        return None
    images = read_header(path).get("images")
    if images is None or images.dtype != "U8" or len(images.shape) != 4:
        raise CheckpointError(f"{path}: expected one uint8 (N, C, H, W) tensor named 'images'")
    n, c, h, w = images.shape
    if n == 0 or c != channels:
        raise CheckpointError(f"{path}: {images.shape} images for a {channels}-channel model")
    largest = SIZE_LIMITS["image_size"]
    if n > MAX_CALIBRATION_IMAGES or max(h, w) > largest or n * c * h * w > MAX_CALIBRATION_BYTES:
        raise CheckpointError(
            f"{path}: {images.shape} images; calibration takes at most "
            f"{MAX_CALIBRATION_IMAGES} images of at most {largest} px, "
            f"{MAX_CALIBRATION_BYTES:,} bytes in all"
        )
    return path


def _check_labels(labels: object, num_classes: int) -> None:
    if labels is None:
        return
    if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
        raise ValueError("labels must be a list of strings")
    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels for a model with {num_classes} classes")
