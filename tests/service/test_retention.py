"""Retention (`gradwatch db prune`) on both databases: old runs go with everything they own through the cascades,
settled webhook deliveries with their attempt log; recent runs, other statuses and pending deliveries stay."""

from __future__ import annotations

import math
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, update

from gradwatch.detect import DetectorConfig
from gradwatch_service.alerting.schemas import SubscriptionCreate
from gradwatch_service.alerting.subscriptions import create_subscription
from gradwatch_service.ingest import append_steps, upsert_run
from gradwatch_service.schemas import RunUpsert, StepBatch
from gradwatch_service.storage.db import now_utc, read_connection, write_transaction
from gradwatch_service.storage.models import incidents, metadata, runs, steps, webhook_attempts, webhook_deliveries
from gradwatch_service.storage.retention import PruneResult, prune

from ..support.databases import new_run_id

DAY = timedelta(days=1)


def _run(engine: Engine, *, status: str, age_days: float, n_steps: int = 0, nan_at: int | None = None) -> int:
    """A run with `n_steps` steps (a NaN loss at `nan_at` opens a nonfinite incident), in `status`, last updated
    `age_days` ago."""
    run_id = new_run_id()
    with write_transaction(engine) as conn:
        upsert_run(conn, run_id, RunUpsert(project="retention", layers=["a"]))
        if n_steps:
            batch = [{"step": i, "time": 1764000000.0 + i, "loss": math.nan if i == nan_at else 1.0,
                      "grad_norm": 1.0, "layer_grad_norms": [0.5]} for i in range(n_steps)]
            append_steps(conn, run_id, StepBatch.model_validate({"steps": batch}), DetectorConfig())
        upsert_run(conn, run_id, RunUpsert(status=status))  # type: ignore[arg-type]
        conn.execute(update(runs).where(runs.c.run_id == run_id).values(updated_at=now_utc() - age_days * DAY))
        return int(conn.execute(select(runs.c.id).where(runs.c.run_id == run_id)).scalar_one())


def _owned(engine: Engine, run_pk: int) -> tuple[int, int, int]:
    """(runs, steps, incidents) rows that run `run_pk` still has."""
    with read_connection(engine) as conn:
        return tuple(int(conn.execute(select(func.count()).select_from(t).where(col == run_pk)).scalar_one())
                     for t, col in ((runs, runs.c.id), (steps, steps.c.run_pk), (incidents, incidents.c.run_pk)))


def _rows_keyed_by(engine: Engine, run_pk: int) -> dict[str, int]:
    """Rows of run `run_pk` in every table keyed by the run (a run_pk column): a table added later is covered."""
    with read_connection(engine) as conn:
        return {t.name: int(conn.execute(select(func.count()).select_from(t).where(t.c.run_pk == run_pk))
                            .scalar_one()) for t in metadata.sorted_tables if "run_pk" in t.c}


def test_old_finished_and_failed_runs_go_with_their_steps_and_incidents(engine: Engine) -> None:
    old_finished = _run(engine, status="finished", age_days=40, n_steps=30, nan_at=20)
    old_failed = _run(engine, status="failed", age_days=31)
    recent = _run(engine, status="finished", age_days=5, n_steps=7, nan_at=3)
    old_running = _run(engine, status="running", age_days=90, n_steps=4)
    before = now_utc() - 30 * DAY
    old_incidents = _owned(engine, old_finished)[2]
    assert old_incidents >= 1  # the NaN opened one: the cascade has something to delete

    dry = prune(engine, before=before, dry_run=True)
    assert dry == PruneResult(runs=2, steps=30, incidents=old_incidents, deliveries=0)
    assert _owned(engine, old_finished) == (1, 30, old_incidents)  # a dry run deletes nothing

    assert prune(engine, before=before) == dry
    assert _owned(engine, old_finished) == (0, 0, 0)
    assert set(_rows_keyed_by(engine, old_finished).values()) == {0}  # every table of run data, by cascade
    assert _owned(engine, old_failed) == (0, 0, 0)
    kept = {recent: _owned(engine, recent), old_running: _owned(engine, old_running)}
    assert kept[recent][:2] == (1, 7) and kept[recent][2] >= 1
    assert kept[old_running] == (1, 4, 0)
    assert prune(engine, before=before) == PruneResult(0, 0, 0, 0)  # run again: nothing left to do

    assert prune(engine, before=before, statuses=["running"]) == PruneResult(runs=1, steps=4, incidents=0,
                                                                            deliveries=0)
    assert _owned(engine, old_running) == (0, 0, 0)
    assert _owned(engine, recent) == kept[recent]


def _delivery(conn: Any, sub_id: int, state: str, age_days: float, attempts: int) -> int:
    at = now_utc() - age_days * DAY
    delivery_id = int(conn.execute(insert(webhook_deliveries).values(
        subscription_id=sub_id, msg_id=f"msg_{new_run_id()}", event="firing", incident="r#1", payload={},
        state=state, attempts=attempts, next_attempt_at=at, retry_from=at, created_at=at, updated_at=at,
    ).returning(webhook_deliveries.c.id)).scalar_one())
    conn.execute(insert(webhook_attempts), [
        {"delivery_id": delivery_id, "attempt": i + 1, "outcome": "failed", "status_code": 500, "latency_ms": 3.0,
         "at": at} for i in range(attempts)])
    return delivery_id


def test_settled_deliveries_older_than_the_cutoff_go_with_their_attempts(engine: Engine) -> None:
    with write_transaction(engine) as conn:
        sub_id = create_subscription(conn, SubscriptionCreate(url="http://127.0.0.1:9/hook")).id
        old_delivered = _delivery(conn, sub_id, "delivered", 40, attempts=2)
        old_dead = _delivery(conn, sub_id, "dead", 40, attempts=3)
        old_pending = _delivery(conn, sub_id, "pending", 40, attempts=1)
        recent_delivered = _delivery(conn, sub_id, "delivered", 1, attempts=1)
    before = now_utc() - 30 * DAY
    assert prune(engine, before=before, dry_run=True).deliveries == 2
    assert prune(engine, before=before).deliveries == 2
    with read_connection(engine) as conn:
        left = set(conn.execute(select(webhook_deliveries.c.id)).scalars())
        attempts = dict(conn.execute(select(webhook_attempts.c.delivery_id, func.count())
                                     .group_by(webhook_attempts.c.delivery_id)).all())
    assert left == {old_pending, recent_delivered}
    assert attempts == {old_pending: 1, recent_delivered: 1}
    assert old_delivered not in attempts and old_dead not in attempts


def test_no_status_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="no run status"):
        prune(engine, before=now_utc(), statuses=[])


def _gradwatch_db(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradwatch_service", "db", *args],
                          env={"GRADWATCH_DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_the_command_prunes_says_what_and_refuses_bad_arguments(engine: Engine, database_url: str) -> None:
    old = _run(engine, status="finished", age_days=10, n_steps=3)
    _run(engine, status="crashed", age_days=10, n_steps=2)

    dry = _gradwatch_db(database_url, "prune", "--older-than", "7", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete 1 runs (finished, failed;" in dry.stdout and "with 3 steps and 0 incidents" in dry.stdout
    assert _owned(engine, old) == (1, 3, 0)

    done = _gradwatch_db(database_url, "prune", "--older-than", "7", "--status", "finished,crashed")
    assert done.returncode == 0, done.stderr
    assert "deleted 2 runs (finished, crashed;" in done.stdout and "with 5 steps" in done.stdout
    assert _owned(engine, old) == (0, 0, 0)

    unknown = _gradwatch_db(database_url, "prune", "--older-than", "7", "--status", "finished,done")
    assert unknown.returncode == 2 and "unknown run status done" in unknown.stderr
    assert "running,finished,failed,crashed,stopped" in unknown.stderr
    assert _gradwatch_db(database_url, "prune", "--older-than", "-1").returncode == 2
    missing = _gradwatch_db(database_url, "prune")
    assert missing.returncode == 1 and "give --older-than DAYS" in missing.stderr
