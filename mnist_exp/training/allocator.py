"""The C allocator's settings for training: memory freed by one step is reused by the next.

Each step allocates and frees the same activations and gradients, several MB each. glibc's
malloc hands the freed top of its heap back to the system (and serves the largest blocks with
mmap), so the next step faults every page in again and the kernel zeroes it. Figures:
docs/performance.md.
"""

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
    """Make glibc's malloc keep freed memory for reuse; False where the C library is not glibc.

    What was freed stays with the process, for its next step, instead of going back to the
    system. Its peak memory barely changes, as a step's memory is in use at the peak anyway.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
