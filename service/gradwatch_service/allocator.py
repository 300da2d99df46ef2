"""glibc malloc settings for a process that builds megabyte-sized numpy temporaries on every batch.

By default glibc serves a large allocation with mmap and gives free memory at the top of its heap back to the OS
once it exceeds a small threshold, so the dozen 1 MB matrices a 1,000-step batch's rollups build are mapped and
faulted in page by page on every batch: the per-step statistics of one batch took 8.6 ms that way against 1.7 ms
with the memory kept (docs/benchmarks.md). Keeping up to TRIM_MB of free heap costs at most that much resident
memory, once. Where the variables glibc reads itself are set (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_),
they win; on other C libraries there is nothing to tune.

What is kept is reused, but not all of it is reusable: a soak of 50 runs (bench/soak.py --probe-memory, 20 min)
held malloc's in-use bytes and the live Python objects flat while the freed memory glibc kept over its arenas grew
by 0.44 MB a minute, all of it RSS. `FreeMemoryReleaser` hands the free pages back (malloc_trim) every minute or
so: one batch then faults its temporaries in again, once.
"""

from __future__ import annotations

import ctypes
import os
import threading

__all__ = ["MMAP_MB", "TRIM_MB", "FreeMemoryReleaser", "release_free_memory", "tune_malloc"]

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


def release_free_memory() -> bool:
    """Give every free page of every malloc arena back to the OS; whether this C library could (glibc)."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim(0)
    return True


class FreeMemoryReleaser:
    """A daemon thread that calls `release_free_memory` every `every_s` seconds until `stop()`; 0 disables."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradwatch-malloc-trim", daemon=True)

    def start(self) -> FreeMemoryReleaser:
        if self.every_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if not release_free_memory():
                return
