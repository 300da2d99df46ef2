"""Run state for Prometheus, read from the database (DESIGN decision 6): every replica reports the same thing.

A scrape reads the active runs (updated within `metrics_active_seconds`, newest first, at most
`metrics_max_runs`) and their open incidents in two queries, and keeps the result for `metrics_cache_seconds`
so that several Prometheus servers, or a burst of scrapes, cost the database one read. Labels are project,
run, signature and severity, never step or layer: a series per run, not per step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, func, select

from ..settings import Settings
from ..storage.db import now_utc, read_connection
from ..storage.models import incidents, projects, runs, steps
from .outbox import delivery_counts, outbox_depth

__all__ = ["RunStateCollector", "read_run_state"]

log = logging.getLogger(__name__)

_RUN = ["project", "run"]


def read_run_state(conn: Connection, *, active_seconds: float, max_runs: int) -> list[Metric]:
    """The run-state metric families, as of now. NaN and ±Infinity in the latest values export as they are."""
    cutoff = now_utc() - timedelta(seconds=active_seconds)
    active = runs.c.updated_at >= cutoff
    n_active = conn.execute(select(func.count()).select_from(runs).where(active)).scalar_one()

    def latest(column: Any) -> Any:
        """The run's latest measured value of `column`: clients may log loss less often than gradients."""
        return (select(column).where(steps.c.run_pk == runs.c.id, column.is_not(None))
                .order_by(steps.c.step.desc()).limit(1).scalar_subquery())

    last_step_time = (select(steps.c.time).where(steps.c.run_pk == runs.c.id, steps.c.step == runs.c.last_step)
                      .scalar_subquery())
    rows = conn.execute(
        select(runs.c.id, runs.c.run_id, projects.c.name.label("project"), runs.c.status, runs.c.last_step,
               latest(steps.c.loss).label("loss"), latest(steps.c.grad_norm).label("grad_norm"),
               last_step_time.label("last_step_time"))
        .join(projects, projects.c.id == runs.c.project_id)
        .where(active).order_by(runs.c.updated_at.desc(), runs.c.id.desc()).limit(max_runs)
    ).all()

    running = GaugeMetricFamily("gradwatch_run_running", "1 while an active run's status is running, else 0",
                                labels=_RUN)
    loss = GaugeMetricFamily("gradwatch_run_loss", "The run's latest measured loss", labels=_RUN)
    grad_norm = GaugeMetricFamily("gradwatch_run_grad_norm", "The run's latest measured total gradient norm",
                                  labels=_RUN)
    last_step = GaugeMetricFamily("gradwatch_run_last_step", "The highest step the run has stored", labels=_RUN)
    last_time = GaugeMetricFamily("gradwatch_run_last_step_timestamp_seconds",
                                  "Unix time of the run's highest step, as the client stamped it", labels=_RUN)
    labels_of: dict[int, list[str]] = {}
    for r in rows:
        labels = [r.project, r.run_id]
        labels_of[r.id] = labels
        running.add_metric(labels, 1.0 if r.status == "running" else 0.0)
        for family, value in ((loss, r.loss), (grad_norm, r.grad_norm), (last_step, r.last_step),
                              (last_time, r.last_step_time)):
            if value is not None:
                family.add_metric(labels, float(value))

    open_incidents = GaugeMetricFamily("gradwatch_run_open_incidents",
                                       "Open incidents of an active run, by signature and severity",
                                       labels=[*_RUN, "signature", "severity"])
    if labels_of:
        counts = conn.execute(
            select(incidents.c.run_pk, incidents.c.signature, incidents.c.severity, func.count())
            .where(incidents.c.status == "open", incidents.c.run_pk.in_(list(labels_of)))
            .group_by(incidents.c.run_pk, incidents.c.signature, incidents.c.severity)
        ).all()
        for run_pk, signature, severity, n in counts:
            open_incidents.add_metric([*labels_of[run_pk], signature, severity], float(n))

    active_family = GaugeMetricFamily("gradwatch_runs_active", "Runs updated within the active window",
                                      value=float(n_active))
    left_out = GaugeMetricFamily("gradwatch_runs_not_exported",
                                 "Active runs left out of the run metrics by GRADWATCH_METRICS_MAX_RUNS",
                                 value=float(max(0, n_active - len(rows))))
    return [running, loss, grad_norm, last_step, last_time, open_incidents, active_family, left_out,
            *_webhook_state(conn)]


def _webhook_state(conn: Connection) -> list[Metric]:
    """The outbox and the delivery log, from the database like run state: every replica reports the same
    numbers, so the rules take max() of the depth, and rate ratios of the outcomes."""
    depth = GaugeMetricFamily("gradwatch_webhook_outbox_depth",
                              "Webhook deliveries waiting to be sent or retried", value=float(outbox_depth(conn)))
    deliveries = CounterMetricFamily("gradwatch_webhook_deliveries",
                                     "Webhook delivery attempts by outcome: delivered, failed (will be retried), "
                                     "dead (retries used up)", labels=["outcome"])
    for outcome, n in sorted(delivery_counts(conn).items()):
        deliveries.add_metric([outcome], float(n))
    return [depth, deliveries]


class RunStateCollector(Collector):
    """A prometheus-client collector over `read_run_state`, cached, and honest about a database it cannot read:
    `gradwatch_run_state_up` is 0 then and the run metrics are absent (a stale copy would hide the outage)."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self._lock = threading.Lock()
        self._families: list[Metric] = []
        self._expires = 0.0

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # one read at a time; scrapes that queue behind it get its result
            if time.monotonic() >= self._expires:
                self._families = self._read()
                self._expires = time.monotonic() + self._settings.metrics_cache_seconds
            families = self._families
        yield from families

    def _read(self) -> list[Metric]:
        start = time.perf_counter()
        try:
            with read_connection(self._engine) as conn:
                families = read_run_state(conn, active_seconds=self._settings.metrics_active_seconds,
                                          max_runs=self._settings.metrics_max_runs)
            up = 1.0
        except Exception:  # noqa: BLE001 - the scrape must still answer, and say the read failed
            log.exception("reading run state for /metrics failed")
            families, up = [], 0.0
        families.append(GaugeMetricFamily("gradwatch_run_state_up",
                                          "1 if the last read of run state from the database succeeded",
                                          value=up))
        families.append(GaugeMetricFamily("gradwatch_run_state_read_duration_seconds",
                                          "How long the last read of run state from the database took",
                                          value=time.perf_counter() - start))
        return families
