"""Process-wide CPU settings."""

import ctypes
import platform

import pytest

from vitkit.runtime import reuse_freed_memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_large_blocks_come_from_the_reusable_heap():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.mallinfo2.restype = _MallInfo2
    assert reuse_freed_memory() is True
    assert reuse_freed_memory() is True  # once per process; later calls are free
    # A 64 MB block (glibc maps anything over 32 MB on its own by default) now comes from
    # the heap, where it stays for reuse once freed: no mapped bytes are added for it.
    mapped = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    assert block
    assert libc.mallinfo2().hblkhd == mapped
    libc.free(ctypes.c_void_p(block))
