"""Incident rows of one episode on each backend: a run whose detection document was stored by the code before
episodes (one incident per signature) goes on as one incident, the others closed as merged into it; a run
that ends with its incident open closes it, with the reason, and queues its `resolved` webhook."""

from __future__ import annotations

import json
import math
from typing import Any

from sqlalchemy import Engine, insert, select

from gradwatch import detect
from gradwatch.incidents import new_incident_state, track_incidents
from gradwatch_service.incidents import advance_detection, close_open_incident
from gradwatch_service.storage.db import now_utc, write_transaction
from gradwatch_service.storage.models import incidents, projects, runs, webhook_deliveries, webhook_subscriptions


def _run_with_v1_doc(conn: Any) -> int:
    """A running run as the code before episodes left it: grad_spike (warning, #1) and grad_growth (critical,
    #2) open, each its own incident row."""
    p = conn.execute(insert(projects).values(name="episodes")).inserted_primary_key[0]
    now = now_utc()
    pk = int(conn.execute(insert(runs).values(run_id="r1", project_id=p, status="running", layer_names=[],
                                              created_at=now, updated_at=now)).inserted_primary_key[0])
    old_open = {}
    for seq, (sig, sev, opened) in enumerate((("grad_spike", "warning", 4), ("grad_growth", "critical", 6)), 1):
        conn.execute(insert(incidents).values(run_pk=pk, seq=seq, signature=sig, severity=sev, status="open",
                                              opened_step=opened, last_step=9, message=sig,
                                              evidence={"opened": {"step": opened}}, opened_at=now,
                                              updated_at=now))
        old_open[sig] = {"signature": sig, "severity": sev, "opened_at": opened, "last_seen": 9, "layer": None,
                         "value": 1.0, "baseline": 1.0, "message": sig, "escalated": False}
    state = detect.new_state()
    state["last_step"] = 9
    doc = {"v": 1, "detector": state, "incidents": {"open": old_open}, "seq": {"grad_spike": 1, "grad_growth": 2},
           "next_seq": 3}
    conn.execute(runs.update().where(runs.c.id == pk).values(detector_state=json.loads(json.dumps(doc))))
    conn.execute(insert(webhook_subscriptions).values(name="on-call", url="http://127.0.0.1:9/hook",
                                                      secret="whsec_x", enabled=True, min_severity="warning",
                                                      created_at=now, updated_at=now))
    return pk


def _step(t: int, loss: float, grad_norm: float) -> detect.StepInput:
    """A step as ingest hands it to detection (`StepColumns.detector_steps`), without layers."""
    return detect.StepInput(t, loss, grad_norm, 0.1)


def _rows(conn: Any, pk: int) -> list[tuple[int, str, str, Any]]:
    rows = conn.execute(select(incidents.c.seq, incidents.c.signature, incidents.c.status, incidents.c.evidence)
                        .where(incidents.c.run_pk == pk).order_by(incidents.c.seq)).all()
    return [(r.seq, r.signature, r.status, (r.evidence or {}).get("resolved", {}).get("reason")) for r in rows]


def test_a_run_stored_before_episodes_goes_on_as_one_incident(engine: Engine) -> None:
    with write_transaction(engine) as conn:
        pk = _run_with_v1_doc(conn)
    with write_transaction(engine) as conn:
        doc = conn.execute(select(runs.c.detector_state).where(runs.c.id == pk)).scalar()
        steps = [_step(10, math.nan, 1.0)]
        outcome = advance_detection(conn, pk, doc, steps, detect.DetectorConfig())
        assert _rows(conn, pk) == [(1, "grad_spike", "open", None),
                                   (2, "grad_growth", "resolved", "merged into incident 1")]
        assert outcome.raised == []  # the NaN joined the open incident, which is critical already: no new page
        assert outcome.state_doc["seq"] == 1 and "merged" not in outcome.state_doc
        timeline = outcome.state_doc["incidents"]["open"]["timeline"]
        assert [(e["step"], e["signature"]) for e in timeline] == [(4, "grad_spike"), (6, "grad_growth"),
                                                                   (10, "nonfinite")]
        stored = conn.execute(select(incidents.c.severity, incidents.c.last_step, incidents.c.evidence)
                              .where(incidents.c.run_pk == pk, incidents.c.seq == 1)).one()
        assert (stored.last_step, [e["signature"] for e in stored.evidence["timeline"]]) == (
            10, ["grad_spike", "grad_growth", "nonfinite"])


def test_a_run_that_ends_with_its_incident_open_closes_it_and_pages_once(engine: Engine) -> None:
    with write_transaction(engine) as conn:
        pk = _run_with_v1_doc(conn)
    with write_transaction(engine) as conn:
        doc = conn.execute(select(runs.c.detector_state).where(runs.c.id == pk)).scalar()
        closed = close_open_incident(conn, pk, doc, "run failed")
        assert closed is not None and closed["incidents"] == new_incident_state() and closed["seq"] is None
        assert _rows(conn, pk) == [(1, "grad_spike", "resolved", "run failed"),
                                   (2, "grad_growth", "resolved", "merged into incident 1")]
        queued = conn.execute(select(webhook_deliveries.c.incident, webhook_deliveries.c.event)
                              .order_by(webhook_deliveries.c.id)).all()
        assert [(q.incident, q.event) for q in queued] == [("r1#2", "resolved"), ("r1#1", "resolved")]
        assert close_open_incident(conn, pk, closed, "run failed") is None  # nothing open: nothing to do


def test_replay_and_service_agree_on_one_incident_per_episode(engine: Engine) -> None:
    """The service's rows are what the pure tracker says, step for step (grad spike, then NaN, then quiet)."""
    with write_transaction(engine) as conn:
        p = conn.execute(insert(projects).values(name="agree")).inserted_primary_key[0]
        now = now_utc()
        pk = int(conn.execute(insert(runs).values(run_id="r2", project_id=p, status="running", layer_names=[],
                                                  created_at=now, updated_at=now)).inserted_primary_key[0])
    steps = [_step(t, 2.0, 1.0 + 0.01 * (t % 3)) for t in range(40)] + [_step(40, 2.0, 50.0), _step(41, math.nan, 1.0)]
    config = detect.DetectorConfig()
    state, inc_state, pages = detect.new_state(), new_incident_state(), []
    for s in steps:
        state, events = detect.advance(state, s, config)
        inc_state, opened, _ = track_incidents(inc_state, events, s.step, config, detect.held_signatures(state))
        pages += [(o["signature"], o["severity"]) for o in opened]
    assert pages == [("grad_spike", "warning"), ("nonfinite", "critical")]
    with write_transaction(engine) as conn:
        outcome = advance_detection(conn, pk, None, steps, config)
        rows = conn.execute(select(incidents.c.seq, incidents.c.signature, incidents.c.severity)
                            .where(incidents.c.run_pk == pk)).all()
    assert [(r.seq, r.signature, r.severity) for r in rows] == [(1, "nonfinite", "critical")]
    assert outcome.raised == [1]
