"""What happens when a training script ends without calling finish(): the run is finished at interpreter
exit, with its status, and a hung service cannot hold the process hostage."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ..support.fakes import HungServer, Recorder

SCRIPT = """
import gradwatch, sys
run = gradwatch.init(project="p", name="exit", run_id=sys.argv[1], batch_age=0.05)
for step in range(50):
    run.log(step, loss=float(step))
if sys.argv[2] == "crash":
    raise RuntimeError("the training loop crashed")
"""


def run_script(url: str, run_id: str, mode: str, spool: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GRADWATCH_URL": url, "GRADWATCH_SPOOL_DIR": str(spool)}
    return subprocess.run([sys.executable, "-c", SCRIPT, run_id, mode], env=env, capture_output=True, text=True,
                          timeout=30)


def test_runs_left_open_are_finished_at_exit(tmp_path: Path) -> None:
    with Recorder() as rec:
        done = run_script(rec.url, "exit-ok", "ok", tmp_path)
        assert done.returncode == 0, done.stderr
        assert sorted(rec.stored("exit-ok")) == list(range(50))
        assert rec.runs["exit-ok"]["status"] == "finished"

        crashed = run_script(rec.url, "exit-crash", "crash", tmp_path)
        assert crashed.returncode == 1 and "the training loop crashed" in crashed.stderr
        assert sorted(rec.stored("exit-crash")) == list(range(50))
        assert rec.runs["exit-crash"]["status"] == "crashed"


def test_a_hung_service_delays_exit_by_the_flush_timeout_only(tmp_path: Path) -> None:
    with HungServer() as hung:
        t0 = time.monotonic()
        done = run_script(hung.url, "exit-hung", "ok", tmp_path)
        elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert elapsed < 2.0 + 2.5  # the default 2 s flush, plus interpreter start-up on a busy machine
    assert "left in" in done.stderr and "gradwatch sync" in done.stderr  # reported, not silent
    assert (tmp_path / "exit-hung" / "run.json").exists()
