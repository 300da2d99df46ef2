"""glibc malloc settings for a process that builds megabyte-sized numpy temporaries on every batch.

By default glibc serves a large allocation with mmap and gives free memory at the top of its heap back to the OS
once it exceeds a small threshold, so the dozen 1 MB matrices a 1,000-step batch's rollups build are mapped and
faulted in page by page on every batch: the per-step statistics of one batch took 8.6 ms that way against 1.7 ms
with the memory kept (docs/benchmarks.md). Keeping up to TRIM_MB of free heap costs at most that much resident
memory, once.

Kept memory is reused only by the thread whose arena holds it, and glibc gives every new thread an arena of its
own (up to 8 per core): the server's worker threads each took a batch now and then, and each arena kept its own
free memory. In a 20-minute soak of 50 runs (bench/soak.py --probe-memory) that free memory grew from 6 to 30 MB
while malloc's in-use bytes and the live Python objects stayed flat. With ARENAS arenas for the process (the GIL
runs one thread's Python at a time, so they are rarely contended) it stayed at 6 MB and RSS was flat.

Where the variables glibc reads itself are set (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
MALLOC_ARENA_MAX), they win; on other C libraries there is nothing to tune.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["ARENAS", "MMAP_MB", "TRIM_MB", "tune_malloc"]

MMAP_MB = 32  # glibc's largest mmap threshold: anything smaller comes from the heap and is reused
TRIM_MB = 64
ARENAS = 2  # the event loop's thread and the worker threads share them
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # <malloc.h>
_tuned = False


def tune_malloc() -> bool:
    """Keep freed memory for reuse, in few arenas (once per process, before the server starts its threads);
    whether glibc's malloc took the settings."""
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
    if _tuned and not os.environ.get("MALLOC_ARENA_MAX"):
        _tuned = bool(mallopt(_M_ARENA_MAX, ARENAS))
    return _tuned
