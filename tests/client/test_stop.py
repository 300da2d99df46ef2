"""Closing the loop in time: a fast job that asked to stop (or raise) on a critical incident does so in the
`log()` of the step that raised it, not when the service's answer comes back a batch later. Real torch
training with steps of a few milliseconds, against a real service."""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402

from ..support.serverproc import ServerProcess  # noqa: E402

pytestmark = pytest.mark.torch

STEPS = 300


def train(run: gradwatch.Run, lr: float) -> tuple[int, int | None, float]:
    """An MLP regression whose SGD steps take a few ms on one thread; with lr too high it diverges. Returns
    the last step trained, the step after whose `log()` `should_stop` was set (None: never) and its loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gradwatch.watch(model, opt, run)
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(4096, 32, generator=g)
    y_all = x_all @ torch.randn(32, 1, generator=g)
    step = 0
    for step in range(STEPS):
        i = (step * 64) % 4096
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x_all[i:i + 64]), y_all[i:i + 64])
        loss.backward()
        opt.step()
        run.log(step, loss=loss)
        if run.should_stop:
            return step, step, loss.item()
    return step, None, loss.item()


def service_incidents(server: ServerProcess, run_id: str) -> list[dict]:
    with urllib.request.urlopen(f"{server.url}/v1/runs/{run_id}/incidents") as response:
        return json.load(response)["incidents"]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few ms a step on a shared machine, and the same numbers on every machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["stop", "raise"])
def test_a_diverging_job_stops_at_the_step_that_raised_the_critical(
        live_server: ServerProcess, tmp_path: Path, mode: str) -> None:
    alerts: list[dict] = []
    run = gradwatch.init(url=live_server.url, spool_dir=tmp_path, on_critical=mode, on_alert=alerts.append)
    if mode == "stop":
        last, stopped, loss = train(run, lr=0.05)
        assert math.isfinite(loss)  # stopped while the loss was still a number, not after it turned NaN
    else:
        with pytest.raises(gradwatch.CriticalIncident) as raised:
            train(run, lr=0.05)
        stopped = last = raised.value.incident["opened_at"]
    report = run.finish(timeout=10)
    assert report.lost == {} and report.delivered == last + 1

    (critical,) = [a for a in alerts if a["severity"] == "critical"]  # reported once, locally
    assert critical["source"] == "local" and stopped == critical["opened_at"]
    # The service, judging the same steps, opened its first critical at that same step.
    first = min((i for i in service_incidents(live_server, run.run_id) if i["severity"] == "critical"),
                key=lambda i: i["opened_step"])
    assert first["opened_step"] == stopped


def test_a_healthy_job_runs_to_the_end_untouched(live_server: ServerProcess, tmp_path: Path) -> None:
    alerts: list[dict] = []
    run = gradwatch.init(url=live_server.url, spool_dir=tmp_path, on_critical="stop", on_alert=alerts.append)
    last, stopped, _ = train(run, lr=0.01)
    report = run.finish(timeout=10)
    assert (last, stopped) == (STEPS - 1, None) and not run.should_stop
    assert report.delivered == STEPS and report.lost == {}
    assert [a for a in alerts if a["severity"] == "critical"] == []
    assert [i for i in service_incidents(live_server, run.run_id) if i["severity"] == "critical"] == []
