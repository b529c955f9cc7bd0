"""Process-wide settings that make PyTorch on a CPU faster."""

from __future__ import annotations

import ctypes
import functools

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
