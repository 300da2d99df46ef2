"""`python bench/_memory_probe.py serve ...` is `gradwatch serve ...` that also writes, every few seconds, where
its memory is: what the OS holds for it against what its allocators hand out.

bench/soak.py starts it with `--probe-memory` to tell a leak (objects that pile up: live Python blocks and
malloc's in-use bytes grow) from an allocator keeping freed memory for reuse (RSS grows while both stay flat).
Every GRADWATCH_MEMORY_PROBE_EVERY seconds (default 5) one JSON line is appended to GRADWATCH_MEMORY_PROBE:
`t_s`, `rss_anon_mb` (/proc: the process's anonymous pages), `malloc_in_use_mb` and `malloc_free_mb` (glibc's
mallinfo2 over all arenas: in use, and freed but kept; mmapped blocks count as in use), `pymalloc_arenas_mb` and
`pymalloc_in_use_mb` (Python's own allocator for small objects, which maps 1 MiB arenas outside malloc: the
arenas held, and the bytes of live blocks in them; from `sys._debugmallocstats`), `python_blocks` (live pymalloc
blocks), `gc_objects` (objects the collector tracks) and `threads`. Sampling takes a few milliseconds; nothing
else changes in the service, but a line written to stderr at that moment by C code would land in the probe's
scratch file (Python code cannot write then: the probe holds the GIL).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import rss_mb  # this script's folder, bench/, is first on sys.path

from gradwatch.cli import main


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> _Mallinfo2 | None:
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc 2.33 and newer
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn()


def _pymalloc_mb() -> tuple[float, float]:
    """(arenas held, bytes in live blocks) of pymalloc in MB; it prints them on the C-level stderr only."""
    with tempfile.TemporaryFile() as scratch:
        saved = os.dup(2)
        try:
            os.dup2(scratch.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        scratch.seek(0)
        text = scratch.read().decode(errors="replace")
    arenas = re.search(r"# arenas allocated current\s*=\s*([\d,]+)", text)
    in_use = re.search(r"# bytes in allocated blocks\s*=\s*([\d,]+)", text)
    if not arenas or not in_use:
        return float("nan"), float("nan")
    arena_mb = 1.0  # pymalloc's arena size since CPython 3.10 (256 KiB before)
    return int(arenas[1].replace(",", "")) * arena_mb, int(in_use[1].replace(",", "")) / (1 << 20)


def sample(t0: float) -> dict[str, float]:
    info = _mallinfo2()
    arenas_mb, pymalloc_in_use_mb = _pymalloc_mb()
    mb = 1 / (1 << 20)
    return {
        "t_s": round(time.monotonic() - t0, 2),
        "rss_anon_mb": round(rss_mb(os.getpid(), "RssAnon"), 2),
        "malloc_in_use_mb": round((info.uordblks + info.hblkhd) * mb, 2) if info else float("nan"),
        "malloc_free_mb": round(info.fordblks * mb, 2) if info else float("nan"),
        "pymalloc_arenas_mb": round(arenas_mb, 2),
        "pymalloc_in_use_mb": round(pymalloc_in_use_mb, 2),
        "python_blocks": sys.getallocatedblocks(),
        "gc_objects": len(gc.get_objects()),
        "threads": threading.active_count(),
    }


def _probe(path: Path, every: float) -> None:
    t0 = time.monotonic()
    with path.open("a") as out:
        while True:
            out.write(json.dumps(sample(t0)) + "\n")
            out.flush()
            time.sleep(every)


if __name__ == "__main__":
    target = os.environ.get("GRADWATCH_MEMORY_PROBE")
    if target and sys.argv[1:2] == ["serve"]:
        every = float(os.environ.get("GRADWATCH_MEMORY_PROBE_EVERY", "5"))
        threading.Thread(target=_probe, args=(Path(target), every), name="memory-probe", daemon=True).start()
    raise SystemExit(main())
