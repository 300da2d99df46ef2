"""glibc malloc settings for a process that builds megabyte-sized numpy temporaries on every batch.

By default glibc serves a large allocation with mmap and gives free memory at the top of its heap back to the OS
once it exceeds a small threshold, so the dozen 1 MB matrices a 1,000-step batch's rollups build are mapped and
faulted in page by page on every batch: the per-step statistics of one batch took 8.6 ms that way against 1.7 ms
with the memory kept (docs/benchmarks.md). Keeping up to TRIM_MB of free heap costs at most that much resident
memory, once. Where the variables glibc reads itself are set (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_),
they win; on other C libraries there is nothing to tune.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MMAP_MB", "TRIM_MB", "tune_malloc"]

MMAP_MB = 32  # glibc's largest mmap threshold: anything smaller comes from the heap and is reused
TRIM_MB = 64
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_tuned = False


def tune_malloc() -> bool:
    """Keep freed memory for reuse (once per process); whether glibc's malloc took the settings."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_MB << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_MB << 20))
    return _tuned
