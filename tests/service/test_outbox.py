"""The webhook outbox on both databases: rows commit with the incident, fan out to matching subscriptions, are
claimed once (leased, SKIP LOCKED), retried with backoff and end delivered or dead."""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, update

from gradwatch_service.alerting.outbox import (
    Outcome,
    backoff_s,
    claim_due,
    delivery_counts,
    enqueue_incident_event,
    on_outbox_commit,
    outbox_depth,
    settle,
)
from gradwatch_service.alerting.schemas import SubscriptionCreate
from gradwatch_service.alerting.subscriptions import create_subscription
from gradwatch_service.ingest import upsert_run
from gradwatch_service.schemas import RunUpsert
from gradwatch_service.storage.db import now_utc, read_connection, write_transaction
from gradwatch_service.storage.models import incidents, runs, webhook_deliveries

from ..support.databases import new_run_id

RETRY = {"retry_base_s": 0.01, "retry_max_delay_s": 0.05, "retry_for_s": 3600.0}


def _subscribe(engine: Engine, **fields: Any) -> int:
    with write_transaction(engine) as conn:
        return create_subscription(conn, SubscriptionCreate(url="http://127.0.0.1:9/hook", **fields)).id


def _run(engine: Engine, project: str = "p") -> int:
    run_id = new_run_id()
    with write_transaction(engine) as conn:
        upsert_run(conn, run_id, RunUpsert(project=project, layers=["a"]))
        return int(conn.execute(select(runs.c.id).where(runs.c.run_id == run_id)).scalar_one())


def _open_incident(conn: Any, run_pk: int, seq: int = 1, severity: str = "critical") -> None:
    now = now_utc()
    conn.execute(insert(incidents).values(
        run_pk=run_pk, seq=seq, signature="nonfinite", severity=severity, status="open", opened_step=40,
        last_step=40, layer="a", value=math.inf, baseline=None, message="grad norm is NaN",
        evidence={"opened": {"step": 40, "values": {"grad_norm": "NaN"}}}, opened_at=now, updated_at=now))


def _deliveries(engine: Engine) -> list[Any]:
    with read_connection(engine) as conn:
        return conn.execute(select(webhook_deliveries).order_by(webhook_deliveries.c.id)).all()


def test_rows_commit_with_the_incident_and_fan_out_to_matching_subscriptions(engine: Engine) -> None:
    everything = _subscribe(engine)
    this_project = _subscribe(engine, project="p", min_severity="critical")
    _subscribe(engine, project="other")
    _subscribe(engine, enabled=False)
    warnings_too = _subscribe(engine, min_severity="warning")
    run_pk = _run(engine)
    with pytest.raises(RuntimeError), write_transaction(engine) as conn:  # the caller's transaction fails
        _open_incident(conn, run_pk)
        assert enqueue_incident_event(conn, run_pk, 1) == 3
        raise RuntimeError("ingest failed after detection")
    assert _deliveries(engine) == []
    with write_transaction(engine) as conn:  # as ingest does: the incident change, then the event
        _open_incident(conn, run_pk)
        assert enqueue_incident_event(conn, run_pk, 1) == 3
    rows = _deliveries(engine)
    assert sorted(r.subscription_id for r in rows) == sorted([everything, this_project, warnings_too])
    assert len({r.msg_id for r in rows}) == 1 and rows[0].msg_id.startswith("msg_")
    assert {r.event for r in rows} == {"firing"} and {r.state for r in rows} == {"pending"}
    payload = rows[0].payload
    assert payload["value"] == "Infinity" and payload["evidence"]["opened"]["values"]["grad_norm"] == "NaN"
    assert payload["id"].endswith("#1") and payload["status"] == "open"
    with read_connection(engine) as conn:
        assert outbox_depth(conn) == 3


def test_warning_incidents_skip_critical_only_subscriptions_and_resolve_sends_resolved(engine: Engine) -> None:
    _subscribe(engine, min_severity="critical")
    warnings = _subscribe(engine)
    run_pk = _run(engine)
    with write_transaction(engine) as conn:
        _open_incident(conn, run_pk, severity="warning")
        assert enqueue_incident_event(conn, run_pk, 1) == 1
    with write_transaction(engine) as conn:
        conn.execute(update(incidents).values(status="resolved", resolved_step=60, resolved_at=now_utc()))
        assert enqueue_incident_event(conn, run_pk, 1) == 1
    firing, resolved = _deliveries(engine)
    assert (firing.event, resolved.event) == ("firing", "resolved")
    assert firing.subscription_id == resolved.subscription_id == warnings
    assert firing.msg_id != resolved.msg_id and firing.incident == resolved.incident


def test_no_subscription_queues_nothing_and_wakes_nobody(engine: Engine) -> None:
    woken: list[int] = []
    remove = on_outbox_commit(engine, lambda: woken.append(1))
    try:
        run_pk = _run(engine)
        with write_transaction(engine) as conn:
            _open_incident(conn, run_pk)
            assert enqueue_incident_event(conn, run_pk, 1) == 0
        assert woken == []
        _subscribe(engine)
        with write_transaction(engine) as conn:
            _open_incident(conn, run_pk, seq=2)
            assert enqueue_incident_event(conn, run_pk, 2) == 1
        assert woken == [1]
    finally:
        remove()


def test_a_claim_is_leased_once_retried_with_backoff_and_settled(engine: Engine) -> None:
    sub = _subscribe(engine)
    run_pk = _run(engine)
    with write_transaction(engine) as conn:
        for seq in (1, 2):
            _open_incident(conn, run_pk, seq=seq)
            enqueue_incident_event(conn, run_pk, seq)
    with write_transaction(engine) as conn:
        (claim,) = claim_due(conn, limit=8, lease_s=60)  # one per subscription at a time
        assert claim.attempt == 1 and claim.subscription_id == sub
        assert claim_due(conn, limit=8, lease_s=60, busy={sub}) == []
    with write_transaction(engine) as conn:
        assert claim_due(conn, limit=8, lease_s=60) != []  # the second event: the first is leased
    with write_transaction(engine) as conn:
        assert settle(conn, claim, Outcome(503, 1.0, "HTTP 503"), **RETRY) == "failed"
    time.sleep(0.1)
    with write_transaction(engine) as conn:
        due = claim_due(conn, limit=8, lease_s=60)
    again = next(c for c in due if c.delivery_id == claim.delivery_id)
    assert (again.attempt, again.msg_id) == (2, claim.msg_id)
    with write_transaction(engine) as conn:
        assert settle(conn, again, Outcome(204, 2.0, None), **RETRY) == "delivered"
        assert delivery_counts(conn) == {"delivered": 1, "failed": 1, "dead": 0}
        assert outbox_depth(conn) == 1
    row = next(r for r in _deliveries(engine) if r.id == claim.delivery_id)
    assert (row.state, row.attempts, row.last_status_code) == ("delivered", 2, 204)


def test_a_sender_that_dies_mid_post_loses_nothing_once_the_lease_ends(engine: Engine) -> None:
    _subscribe(engine)
    run_pk = _run(engine)
    with write_transaction(engine) as conn:
        _open_incident(conn, run_pk)
        enqueue_incident_event(conn, run_pk, 1)
    with write_transaction(engine) as conn:
        (lost,) = claim_due(conn, limit=1, lease_s=0.2)  # ... and the process is killed
    with write_transaction(engine) as conn:
        assert claim_due(conn, limit=1, lease_s=60) == []
    time.sleep(0.3)
    with write_transaction(engine) as conn:
        (retaken,) = claim_due(conn, limit=1, lease_s=60)
    assert (retaken.delivery_id, retaken.msg_id, retaken.attempt) == (lost.delivery_id, lost.msg_id, 2)
    with write_transaction(engine) as conn:  # the lost POST did arrive after all: that settles it
        assert settle(conn, lost, Outcome(200, 1.0, None), **RETRY) == "delivered"
        assert settle(conn, retaken, Outcome(None, 1.0, "timeout"), **RETRY) == "failed"  # too late to matter
    (row,) = _deliveries(engine)
    assert (row.state, row.attempts) == ("delivered", 2)


def test_retries_stop_when_the_window_is_over(engine: Engine) -> None:
    _subscribe(engine)
    run_pk = _run(engine)
    with write_transaction(engine) as conn:
        _open_incident(conn, run_pk)
        enqueue_incident_event(conn, run_pk, 1)
        conn.execute(update(webhook_deliveries).values(retry_from=now_utc() - timedelta(hours=25)))
    with write_transaction(engine) as conn:
        (claim,) = claim_due(conn, limit=1, lease_s=60)
        assert settle(conn, claim, Outcome(None, 10.0, "ConnectionRefusedError"), retry_base_s=5,
                      retry_max_delay_s=3600, retry_for_s=86400) == "dead"
        assert outbox_depth(conn) == 0 and delivery_counts(conn)["dead"] == 1


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    for attempt, nominal in ((1, 5), (2, 10), (4, 40), (20, 3600), (500, 3600)):
        delays = [backoff_s(attempt, 5, 3600) for _ in range(200)]
        assert nominal * 0.5 <= min(delays) and max(delays) <= nominal * 1.5
        assert max(delays) - min(delays) > nominal * 0.3  # jittered


def test_replicas_claiming_at_once_skip_each_others_rows(engine: Engine) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite writers are serialised by the write lock; SKIP LOCKED is PostgreSQL's")
    subs = [_subscribe(engine) for _ in range(4)]
    run_pk = _run(engine)
    with write_transaction(engine) as conn:
        _open_incident(conn, run_pk)
        enqueue_incident_event(conn, run_pk, 1)
    with engine.connect() as a, engine.connect() as b, a.begin():
        first = claim_due(a, limit=2, lease_s=60)
        with b.begin():  # a still holds its row locks: b skips them instead of waiting
            second = claim_due(b, limit=8, lease_s=60)
    assert len(first) == 2 and len(second) == 2
    assert {c.subscription_id for c in first + second} == set(subs)
