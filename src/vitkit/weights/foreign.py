"""Reading other libraries' checkpoint files safely, and fitting a vitkit config to them.

Weights come from safetensors, or from PyTorch files read with `weights_only=True`: a pickle
that would build arbitrary objects or run code is refused, never executed.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import zipfile
from pathlib import Path

import torch

from vitkit.config import MAX_PARAMS
from vitkit.weights.format import CheckpointError, read_safetensors

# The paper's widths have these head counts; other widths assume 64-dimensional heads.
# (Weights alone do not fix the head count: qkv is (3D, D) whatever the split.)
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# The largest model vitkit builds, in float64: more unpacked bytes are no checkpoint of ours.
MAX_UNPACKED_BYTES = 8 * MAX_PARAMS


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file or a PyTorch `.pth`/`.bin`/`.pt` state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    check_unpacked_size(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the file holds Python objects beyond tensors (possibly code); "
            f"only plain state dicts load. Convert it to safetensors where it was made. ({e})"
        ) from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {e}") from None
    for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    for name, tensor in obj.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name} is {tensor.dtype}, not floating-point")
    return obj


def check_unpacked_size(path: Path) -> None:
    """Refuse a zip (PyTorch's format, and .npz) that would unpack to more bytes than any
    model vitkit builds: a few compressed kilobytes can inflate to terabytes."""
    size = path.stat().st_size
    # Not a zip (or a broken one): its reader says so.
    with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(path) as z:
        size = sum(info.file_size for info in z.infolist())
    if size > MAX_UNPACKED_BYTES:
        raise CheckpointError(
            f"{path}: unpacks to {size:,} bytes, more than the largest model vitkit builds"
        )


def default_heads(width: int) -> int:
    return HEADS_BY_WIDTH.get(width, max(1, width // 64))


def grid_of(num_tokens: int) -> int | None:
    """The side of a square grid of `num_tokens` patches, or None."""
    side = math.isqrt(num_tokens)
    return side if side * side == num_tokens else None
