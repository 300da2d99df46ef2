"""gradwatch.testing.MemoryTransport as a user would test their instrumentation with it: no server, the real
sender, spool and local detection."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import gradwatch
from gradwatch.testing import MemoryTransport


def test_a_run_through_the_memory_transport_stores_what_was_logged(tmp_path: Path) -> None:
    transport = MemoryTransport()
    run = gradwatch.init(project="p", name="n", config={"lr": 0.1}, transport=transport, spool_dir=tmp_path)
    for step in range(5):
        run.log(step, loss=1.0 / (step + 1), lr=0.1)
        run.log_layers(step, grad_norms={"fc.weight": float(step), "fc.bias": math.nan if step == 3 else 0.5})
    report = run.finish()
    assert report.delivered == 5 and report.lost == {}
    assert transport.runs[run.run_id]["config"] == {"lr": 0.1} and transport.runs[run.run_id]["status"] == "finished"
    steps = transport.steps(run.run_id)
    assert [s["step"] for s in steps] == list(range(5))
    assert steps[2]["loss"] == 1 / 3 and steps[2]["layer_grad_norms"] == {"fc.weight": 2.0, "fc.bias": 0.5}
    assert math.isnan(steps[3]["layer_grad_norms"]["fc.bias"])  # non-finite values come back as floats


def test_an_outage_spools_and_the_steps_arrive_once_it_ends(tmp_path: Path) -> None:
    transport = MemoryTransport()
    transport.down = True
    run = gradwatch.init(transport=transport, spool_dir=tmp_path, batch_age=0.01, min_backoff=0.01, max_backoff=0.02)
    for step in range(4):
        run.log(step, loss=1.0)
    assert not run.flush(timeout=0.5)
    assert transport.steps(run.run_id) == []
    transport.down = False
    report = run.finish(timeout=5)
    assert report.delivered == 4 and report.spooled == 0
    assert [s["step"] for s in transport.steps(run.run_id)] == [0, 1, 2, 3]


def test_a_scripted_incident_reaches_on_alert_and_stops_the_loop(tmp_path: Path) -> None:
    transport = MemoryTransport()
    transport.open_incident("grad_growth", "critical", step=1, layer="fc.weight")
    alerts: list[dict] = []
    run = gradwatch.init(transport=transport, spool_dir=tmp_path, on_critical="stop", local_detection=False,
                         on_alert=alerts.append, batch_age=0.01)
    step = 0
    for step in range(1000):
        run.log(step, loss=1.0)
        if run.should_stop:
            break
        if step == 2:
            run.flush()  # the service's answer comes with the batch
    assert run.should_stop and step < 1000
    assert [a["signature"] for a in alerts] == ["grad_growth"]
    run.finish()


def test_a_misspelled_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="transprt"):
        gradwatch.init(transprt=MemoryTransport(), spool_dir=tmp_path)  # type: ignore[call-arg]
