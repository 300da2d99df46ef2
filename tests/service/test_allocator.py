"""allocator.tune_malloc: freed megabytes stay in the process for the next batch instead of going back to the OS
(and being faulted in again). In fresh interpreters, so the settings of this one do not matter."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

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
