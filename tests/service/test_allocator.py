"""allocator.tune_malloc: freed megabytes stay in the process for the next batch instead of going back to the OS
(and being faulted in again), in few arenas, so that what one thread frees another reuses. In fresh interpreters,
so the settings of this one do not matter."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from gradwatch_service.allocator import ARENAS

PROBE = r"""
import sys
import numpy as np
from gradwatch_service.allocator import tune_malloc
def anon_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) / 1024
took = tune_malloc() if sys.argv[1] == "tuned" else False
before = anon_mb()
for _ in range(3):
    parts = [np.ones((1000, 154)) for _ in range(12)]  # a batch's statistics: 12 x 1.2 MB, written
    del parts
print(took, round(anon_mb() - before, 1))
"""


def _probe(mode: str, env: dict[str, str] | None = None) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or "libc" not in (ctypes.util.find_library("c") or ""),
                    reason="glibc's malloc only")
def test_freed_batch_memory_is_kept_for_reuse_and_glibc_variables_win() -> None:
    took, kept = _probe("tuned")
    assert took and kept >= 10  # the 14 MB of the last batch stay resident, ready for the next
    took, kept = _probe("default")
    assert not took and kept < 5  # glibc's default hands them back (and faults them in again next time)
    took, _ = _probe("tuned", {"MALLOC_TRIM_THRESHOLD_": "131072", "PATH": "/usr/bin:/bin"})
    assert not took



ARENA_PROBE = r"""
import ctypes, sys, tempfile, threading
from gradwatch_service.allocator import tune_malloc
if sys.argv[1] == "tuned":
    tune_malloc()
def work():  # as a server's worker threads do: each allocates, at the same time as the others
    kept = [bytes(100_000) for _ in range(10)]
    started.wait()
started = threading.Barrier(6)
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
with tempfile.NamedTemporaryFile(suffix=".xml") as report:
    fp = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, fp)  # one <heap nr="..."> element per arena
    libc.fclose(fp)
    print(open(report.name).read().count("<heap nr="))
"""


def _arenas(mode: str, **env: str) -> int:
    return int(subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True, check=True,
                              env={**os.environ, **env}).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux") or "libc" not in (ctypes.util.find_library("c") or ""),
                    reason="glibc's malloc only")
def test_threads_share_two_arenas_instead_of_keeping_free_memory_in_one_each() -> None:
    assert _arenas("default") >= 4  # glibc: an arena per new thread (up to 8 per core), each with its own free memory
    assert _arenas("tuned") == ARENAS
    assert _arenas("tuned", MALLOC_ARENA_MAX="3") == 3  # glibc's own variable wins
