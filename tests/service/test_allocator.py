"""allocator.tune_malloc: freed megabytes stay in the process for the next batch instead of going back to the OS
(and being faulted in again); and the releaser hands back the free pages that keeping strands between live blocks.
In fresh interpreters, so the settings of this one do not matter."""

from __future__ import annotations

import asyncio
import ctypes.util
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gradwatch_service.app import create_app
from gradwatch_service.db import make_engine
from gradwatch_service.migrate import upgrade
from gradwatch_service.settings import Settings

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


RELEASE_PROBE = r"""
import sys, time
from gradwatch_service.allocator import FreeMemoryReleaser, release_free_memory, tune_malloc
def anon_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) / 1024
tune_malloc()
def fragment():
    blocks = [bytes(65536) for _ in range(1600)]  # 100 MB from malloc's heap, every page written
    return blocks[1::2]  # every other one freed: holes the top-of-heap trim cannot reach
kept = fragment()
held = anon_mb()
if sys.argv[1] == "call":
    took = release_free_memory()
else:
    releaser = FreeMemoryReleaser(float(sys.argv[1])).start()
    time.sleep(0.5)
    releaser.stop()
    took = True
print(took, round(held - anon_mb(), 1))
"""


def _release(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or "libc" not in (ctypes.util.find_library("c") or ""),
                    reason="glibc's malloc only")
def test_free_memory_kept_between_live_blocks_goes_back_to_the_os_on_release_and_on_the_releasers_clock() -> None:
    took, released = _release("call")
    assert took and released >= 25  # most of the 50 MB of holes between the live blocks (32 MB here)
    took, released = _release("0.1")  # the service's thread, every 0.1 s
    assert took and released >= 25
    took, released = _release("0")  # GRADWATCH_RELEASE_FREE_MEMORY_S=0: no thread, nothing handed back
    assert released < 5


@pytest.mark.parametrize("every_s", [60.0, 0.0])
def test_the_service_runs_the_releaser_for_its_lifetime_unless_switched_off(tmp_path: Path, every_s: float) -> None:
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    engine = make_engine(url)
    upgrade(engine)
    app = create_app(Settings(_env_file=None, database_url=url, release_free_memory_s=every_s,  # type: ignore[call-arg]
                              webhook_delivery=False), engine)

    def releasers() -> int:
        return sum(t.name == "gradwatch-malloc-trim" and t.is_alive() for t in threading.enumerate())

    async def lifetime() -> int:
        async with app.router.lifespan_context(app):
            return releasers()

    assert asyncio.run(lifetime()) == (1 if every_s else 0)
    assert releasers() == 0  # stopped with the app, at once although its clock says a minute
