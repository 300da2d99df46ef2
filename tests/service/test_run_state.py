"""Run state for Prometheus, read from the database on each backend: which runs are active, the cap and the count
of runs left out, latest values with NaN and Infinity kept, open incidents, and a database that cannot be read."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from prometheus_client.core import Metric
from sqlalchemy import Engine, insert

from gradwatch_service.alerting.run_state import RunStateCollector, read_run_state
from gradwatch_service.settings import Settings
from gradwatch_service.storage.db import make_engine, now_utc, write_transaction
from gradwatch_service.storage.dialect import sqlite_real_in
from gradwatch_service.storage.models import incidents, projects, runs, steps


def _samples(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def _value(families: list[Metric], name: str, **labels: str) -> float | None:
    return _samples(families).get((name, tuple(sorted(labels.items()))))


def _add_run(conn: Any, project_id: int, run_id: str, *, age_s: float = 0, status: str = "running",
             step_values: list[tuple[float | None, float | None]] = ()) -> int:  # type: ignore[assignment]
    at = now_utc() - timedelta(seconds=age_s)
    pk = conn.execute(insert(runs).values(
        run_id=run_id, project_id=project_id, status=status, layer_names=[], created_at=at, updated_at=at,
        last_step=len(step_values) - 1 if step_values else None)).inserted_primary_key[0]
    for i, (loss, grad_norm) in enumerate(step_values):
        if conn.dialect.name == "sqlite":  # stored as ingest stores them (codec): NaN as the text 'NaN'
            conn.exec_driver_sql("INSERT INTO steps (run_pk, step, time, loss, grad_norm) VALUES (?, ?, ?, ?, ?)",
                                 (pk, i, 1000.0 + i, sqlite_real_in(loss), sqlite_real_in(grad_norm)))
        else:
            conn.execute(insert(steps).values(run_pk=pk, step=i, time=1000.0 + i, loss=loss, grad_norm=grad_norm))
    return int(pk)


def _add_incident(conn: Any, run_pk: int, seq: int, signature: str, severity: str, status: str = "open") -> None:
    now = now_utc()
    conn.execute(insert(incidents).values(run_pk=run_pk, seq=seq, signature=signature, severity=severity,
                                          status=status, opened_step=0, last_step=0, message="m",
                                          opened_at=now, updated_at=now))


def _project(conn: Any, name: str = "vision") -> int:
    return int(conn.execute(insert(projects).values(name=name)).inserted_primary_key[0])


def test_latest_values_keep_nan_and_infinity_and_skip_unmeasured_steps(engine: Engine) -> None:
    with write_transaction(engine) as conn:
        p = _project(conn)
        nan_run = _add_run(conn, p, "nan", step_values=[(2.0, 1.0), (float("nan"), float("inf"))])
        _add_run(conn, p, "sparse", step_values=[(2.5, 1.0), (None, 1.5), (None, -float("inf"))])
        _add_incident(conn, nan_run, 1, "nonfinite", "critical")
        _add_incident(conn, nan_run, 2, "grad_spike", "warning", status="resolved")
    with engine.connect() as conn:
        fams = read_run_state(conn, active_seconds=3600, max_runs=100)
    assert math.isnan(_value(fams, "gradwatch_run_loss", project="vision", run="nan"))  # type: ignore[arg-type]
    assert _value(fams, "gradwatch_run_grad_norm", project="vision", run="nan") == math.inf
    assert _value(fams, "gradwatch_run_loss", project="vision", run="sparse") == 2.5  # latest *measured* loss
    assert _value(fams, "gradwatch_run_grad_norm", project="vision", run="sparse") == -math.inf
    assert _value(fams, "gradwatch_run_last_step", project="vision", run="sparse") == 2
    assert _value(fams, "gradwatch_run_last_step_timestamp_seconds", project="vision", run="sparse") == 1002.0
    assert _value(fams, "gradwatch_run_running", project="vision", run="nan") == 1
    assert _value(fams, "gradwatch_run_open_incidents", project="vision", run="nan", signature="nonfinite",
                  severity="critical") == 1
    assert not any(k[0] == "gradwatch_run_open_incidents" and ("signature", "grad_spike") in k[1]
                   for k in _samples(fams))  # resolved incidents are not open


def test_only_recently_updated_runs_are_exported_up_to_the_cap(engine: Engine) -> None:
    with write_transaction(engine) as conn:
        p = _project(conn)
        for i in range(5):
            _add_run(conn, p, f"new-{i}", age_s=10 * i, status="running" if i else "finished")
        _add_run(conn, p, "old", age_s=7200)
    with engine.connect() as conn:
        fams = read_run_state(conn, active_seconds=3600, max_runs=3)
    exported = {dict(k[1])["run"] for k in _samples(fams) if k[0] == "gradwatch_run_running"}
    assert exported == {"new-0", "new-1", "new-2"}  # newest first
    assert _value(fams, "gradwatch_runs_active") == 5
    assert _value(fams, "gradwatch_runs_not_exported") == 2
    assert _value(fams, "gradwatch_run_running", project="vision", run="new-0") == 0  # finished
    # runs with no step yet have no latest values rather than made-up ones
    assert _value(fams, "gradwatch_run_last_step", project="vision", run="new-1") is None


def test_collector_caches_and_reports_an_unreadable_database(engine: Engine, tmp_path: Any) -> None:
    collector = RunStateCollector(engine, Settings(metrics_cache_seconds=60))
    first = _samples(list(collector.collect()))
    with write_transaction(engine) as conn:
        _add_run(conn, _project(conn), "later")
    assert _samples(list(collector.collect())) == first  # served from the cache
    assert first[("gradwatch_run_state_up", ())] == 1

    empty = make_engine(f"sqlite:///{tmp_path / 'no-schema.db'}")  # no tables: every read fails
    try:
        broken = _samples(list(RunStateCollector(empty, Settings()).collect()))
    finally:
        empty.dispose()
    assert broken[("gradwatch_run_state_up", ())] == 0
    assert not any(name.startswith("gradwatch_run_loss") for name, _ in broken)
