"""The client against a real gradwatch server: exactly-once delivery through crashes and outages.

Each test trains a tiny real model with watch() and checks, through the query API, that every logged step is
stored exactly once with the values that were logged.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import gradwatch

from ..support.serverproc import ServerProcess

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

FAST = {"batch_age": 0.05, "batch_size": 20, "min_backoff": 0.05, "max_backoff": 0.25, "flush_timeout": 5.0}


class TinyTraining:
    """A small MLP on a fixed regression task, instrumented with watch() and clipped with our drop-in."""

    def __init__(self, run: gradwatch.Run) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.run = run
        self.losses: dict[int, float] = {}
        gradwatch.watch(self.model, self.opt, run)
        self.step = 0

    def train(self, n: int) -> None:
        for _ in range(n):
            g = torch.Generator().manual_seed(self.step)
            x = torch.randn(16, 8, generator=g)
            y = x.sum(dim=1, keepdim=True)
            self.opt.zero_grad()
            loss = torch.nn.functional.mse_loss(self.model(x), y)
            loss.backward()
            gradwatch.clip_grad_norm_(self.model.parameters(), 5.0)
            self.opt.step()
            self.losses[self.step] = loss.item()
            self.run.log(self.step, loss=loss)
            self.step += 1


def stored_steps(url: str, run_id: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/v1/runs/{run_id}/steps?limit=100000", timeout=10) as r:
        return json.loads(r.read())["steps"]


def get_run(url: str, run_id: str) -> dict:
    with urllib.request.urlopen(f"{url}/v1/runs/{run_id}", timeout=10) as r:
        return json.loads(r.read())


def assert_exactly_once(url: str, training: TinyTraining) -> None:
    steps = stored_steps(url, training.run.run_id)
    numbers = [s["step"] for s in steps]
    assert numbers == sorted(set(numbers)), "a step was stored twice"
    assert numbers == list(range(training.step)), "a step is missing"
    for s in steps:
        assert math.isclose(s["loss"], training.losses[s["step"]], rel_tol=1e-6)
        assert s["grad_norm"] is not None and len(s["layer_grad_norms"]) == 4


def test_exactly_once_through_a_server_crash(live_server: ServerProcess, tmp_path: Path) -> None:
    run = gradwatch.init(project="client-tests", name="crash", url=live_server.url, spool_dir=tmp_path, **FAST)
    training = TinyTraining(run)
    training.train(60)
    run.flush()
    live_server.kill()  # SIGKILL, mid-run: whatever was in flight may or may not be committed
    training.train(60)
    live_server.start()
    training.train(60)
    report = run.finish()
    assert report.lost == {} and report.spooled == 0
    assert_exactly_once(live_server.url, training)
    assert get_run(live_server.url, run.run_id)["status"] == "finished"


def test_job_starting_before_the_service_loses_nothing(tmp_path: Path) -> None:
    server = ServerProcess(f"sqlite:///{tmp_path / 'late.db'}", log_path=tmp_path / "server.log")
    run = gradwatch.init(name="early", url=server.url, spool_dir=tmp_path / "spool", **FAST)
    training = TinyTraining(run)
    try:
        training.train(50)
        server.start()
        training.train(50)
        report = run.finish()
        assert report.lost == {} and report.spooled == 0
        assert_exactly_once(server.url, training)
    finally:
        server.stop()


def test_job_ending_while_the_service_is_down_is_delivered_by_sync(tmp_path: Path) -> None:
    server = ServerProcess(f"sqlite:///{tmp_path / 'down.db'}", log_path=tmp_path / "server.log")
    spool = tmp_path / "spool"
    run = gradwatch.init(name="orphan", url=server.url, spool_dir=spool, **FAST)
    training = TinyTraining(run)
    training.train(40)
    report = run.finish("finished", timeout=0.5)
    assert report.spooled == 40 and report.lost == {}
    try:
        server.start()
        cli = [sys.executable, "-m", "gradwatch.cli", "sync", str(spool)]
        out = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"{run.run_id}: 40 steps sent" in out.stdout
        assert_exactly_once(server.url, training)
        assert get_run(server.url, run.run_id)["status"] == "finished"
        again = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "nothing to sync" in again.stdout
        assert_exactly_once(server.url, training)
    finally:
        server.stop()
