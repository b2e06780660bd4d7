"""The C allocator's settings for training: memory freed by one step is reused by the next,
where glibc would hand it back and the next step fault every page in again (figures:
docs/performance.md)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # blocks up to this size come from the heap: glibc's maximum
TRIM_THRESHOLD = 2**30  # free memory kept at the heap's top before any is handed back


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (the peak barely changes: a step's
    memory is in use at the peak anyway); False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
