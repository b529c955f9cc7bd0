"""What the hardware offers and how to use it: CPU features, the precisions that run faster
than fp32 here, and process-wide settings that make PyTorch on a CPU faster."""

from __future__ import annotations

import ctypes
import functools
import platform
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "int8")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default glibc maps each allocation over 32 MB afresh and unmaps it when freed, and
    trims the heap as soon as its top is free, so the same activations are faulted in page
    by page again at every step. Keeping them is what PyTorch's GPU caching allocator does;
    the cost is that the process holds on to its peak memory. Measured on a 2-core CPU, S/16
    training steps (batch 32, bf16) ran 20-35% faster. Returns whether it applied (glibc only).
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        mallopt = libc.mallopt
    except (AttributeError, OSError):
        return False
    # Both limits are ints: 1 GiB for mapping an allocation on its own, 2 GiB of free top.
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Hand the memory glibc's malloc keeps for reuse (see `reuse_freed_memory`) back to the
    OS now: between phases whose tensors differ (training steps, then an evaluation), so that
    the next phase's peak is not added on top of the last one's leftovers. Returns whether it
    applied (glibc only)."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (AttributeError, OSError):
        return False


@functools.cache
def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo (Linux), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_name() -> str:
    """The CPU's model name, e.g. "AMD EPYC" (Linux), else the machine's architecture."""
    return _cpuinfo("model name") or platform.machine()


def fast_precisions(device: str | torch.device = "cpu") -> list[str]:
    """The reduced precisions this device runs faster than fp32, fastest first."""
    device = torch.device(device)
    if device.type == "cuda":
        return ["bf16"] if torch.cuda.is_bf16_supported() else []
    if device.type != "cpu":
        return []
    modes = ["int8"] if int8_backend() else []
    if cpu_flags() & {"amx_bf16", "avx512_bf16"}:
        modes.append("bf16")
    return modes


def int8_backend() -> str | None:
    """Whose kernels run int8 inference fast on this CPU, or None.

    "onednn": PyTorch's quantised linear layers (oneDNN), on CPUs with int8 dot products
    (AVX-512-VNNI, AVX-VNNI, AMX). "onnxruntime": ONNX Runtime's dynamic int8 (its AVX2
    kernels multiply u8 by s8 pairwise), on x86 CPUs with AVX2 but no VNNI: measured on a
    2-core AVX2 EPYC, S/16 and B/16 ran 1.4-2.2x faster than fp32 in it, while PyTorch's int8
    graph (oneDNN's AVX2 gemm with quantisation around it) ran slower than fp32 (BENCHMARKS.md).
    """
    flags = cpu_flags()
    if flags & {"amx_int8", "avx512_vnni", "avx_vnni"} and torch.backends.mkldnn.is_available():
        return "onednn"
    if "avx2" in flags:
        return "onnxruntime"
    return None


def resolve_precision(
    precision: str, device: str | torch.device = "cpu", allow_int8: bool = True
) -> str:
    """The concrete mode for `precision` on `device` ("auto" picks; the others are checked)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    fast = fast_precisions(device)
    if precision == "auto":
        usable = [p for p in fast if p != "int8" or allow_int8]
        return usable[0] if usable else "fp32"
    if precision == "int8" and torch.device(device).type != "cpu":
        raise ValueError("int8 inference runs on x86 CPUs only; use bf16 on this device")
    return precision


def auto_bf16(device: torch.device) -> bool:
    """bf16 autocast for training wherever the hardware has fast bf16: measured on a 2-core
    AVX-512-bf16 CPU, steps are 1.7x faster at width 96 and 2.5x at width 192 (attention as
    plain bf16 matmuls, see `vitkit.model.encoder.explicit_attention`), and the long
    Fashion-MNIST recipe learns as in fp32."""
    return "bf16" in fast_precisions(device)
