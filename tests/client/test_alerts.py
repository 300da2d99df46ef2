"""Closing the loop without the service: local detection raises alerts while the service is down."""

from __future__ import annotations

from pathlib import Path

import pytest

import gradwatch

from ..support.fakes import Recorder, closed_port
from ..support.serverproc import ServerProcess


def closed_port_url() -> str:
    return f"http://127.0.0.1:{closed_port()}"


def test_local_detection_alerts_and_stops_with_the_service_down(tmp_path: Path) -> None:
    alerts: list[dict] = []
    run = gradwatch.init(url=closed_port_url(), spool_dir=tmp_path, local_detection=True, on_critical="stop",
                         on_alert=alerts.append, batch_age=0.05, flush_timeout=1.0)
    for step in range(40):
        run.log(step, loss=1.0 / (step + 1), grad_norm=1.0 + 0.01 * (step % 3))
    assert not run.should_stop
    run.log(40, loss=float("nan"), grad_norm=float("inf"))
    assert run.should_stop  # in the log() of the step itself, with no service to answer
    report = run.finish(timeout=0.5)
    signatures = {a["signature"] for a in alerts}
    assert "nonfinite" in signatures
    nonfinite = next(a for a in alerts if a["signature"] == "nonfinite")
    assert nonfinite["severity"] == "critical" and nonfinite["source"] == "local"
    assert nonfinite["opened_at"] == 40
    assert report.lost == {}  # the steps themselves wait in the spool


def test_an_alert_seen_locally_and_from_the_service_is_reported_once(tmp_path: Path) -> None:
    alerts: list[dict] = []
    with Recorder() as rec:
        rec.incidents = [{"id": 1, "signature": "nonfinite", "severity": "critical", "opened_at": 5,
                          "layer": None}]
        run = gradwatch.init(url=rec.url, spool_dir=tmp_path, local_detection=True, on_alert=alerts.append,
                             batch_age=0.05)
        for step in range(5):
            run.log(step, loss=1.0, grad_norm=1.0)
        with pytest.warns(RuntimeWarning, match="nonfinite"):  # on_critical="warn", at the step itself
            for step in range(5, 9):
                run.log(step, loss=float("nan"), grad_norm=float("nan"))
        run.finish()
    assert [(a["signature"], a["source"]) for a in alerts] == [("nonfinite", "local")]


def test_an_alarm_that_opened_and_resolved_inside_one_batch_still_reaches_on_alert(
        live_server: ServerProcess, tmp_path: Path) -> None:
    alerts: list[dict] = []
    run = gradwatch.init(url=live_server.url, spool_dir=tmp_path, on_alert=alerts.append, batch_age=30.0)
    for step in range(40):
        run.log(step, loss=1.0 / (step + 1), grad_norm=1.0 + 0.01 * (step % 3))
    run.log(40, loss=0.02, grad_norm=float("inf"))
    for step in range(41, 80):  # quiet long enough for the service to resolve it within the same batch
        run.log(step, loss=1.0 / (step + 1), grad_norm=1.0 + 0.01 * (step % 3))
    report = run.finish(timeout=10)
    assert report.lost == {} and report.delivered == 80
    (alert,) = [a for a in alerts if a["signature"] == "nonfinite"]
    assert (alert["severity"], alert["opened_step"], alert["status"]) == ("critical", 40, "resolved")


def test_a_failing_detector_costs_neither_steps_nor_the_loop(tmp_path: Path, monkeypatch) -> None:
    from gradwatch import detect

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug in a detector")

    monkeypatch.setattr(detect, "advance", broken)
    with Recorder() as rec:
        run = gradwatch.init(url=rec.url, spool_dir=tmp_path, on_critical="stop", batch_age=0.05)
        for step in range(10):
            run.log(step, loss=float("nan"))
        report = run.finish()
        assert sorted(rec.stored(run.run_id)) == list(range(10))
    assert report.lost == {} and not run.should_stop
