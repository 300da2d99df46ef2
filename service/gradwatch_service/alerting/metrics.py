"""The process's own metrics (service health and ingest), and the registry /metrics exposes.

These live in process memory, so with `serve --workers N` each worker writes them to prometheus-client's
multiprocess directory and a scrape of any worker sums them all (`serving_registry`). Run state is different:
it comes from the database (`run_state.py`), so every replica reports the same thing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext

__all__ = ["MULTIPROC_ENV", "observe_request", "record_batch", "observe_detector_seconds", "count_incident_opened",
           "count_database_busy", "count_database_errors", "serving_registry"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

disable_created_metrics()  # `*_created` series double the output and no rule of ours reads them

HTTP_REQUESTS = Counter("gradwatch_http_requests_total", "HTTP requests answered, by route template and status",
                        ["method", "route", "status"])
HTTP_DURATION = Histogram("gradwatch_http_request_duration_seconds",
                          "Time from a request's arrival to the end of its response", ["method", "route"])
DATABASE_ERRORS = Counter("gradwatch_database_errors_total", "Database errors raised to the service, by DBAPI class",
                          ["kind"])
INGESTED_STEPS = Counter("gradwatch_ingested_steps_total", "Steps stored (resent duplicates not counted)")
INGESTED_VALUES = Counter("gradwatch_ingested_values_total", "Measured values stored: scalars and per-layer norms")
BATCH_STEPS = Histogram("gradwatch_ingest_batch_steps", "Steps per ingested batch",
                        buckets=(1, 10, 50, 100, 500, 1000, 5000, 20000))
DETECTOR_SECONDS = Histogram("gradwatch_detector_duration_seconds", "Time the detectors took over one batch",
                             buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
INCIDENTS_OPENED = Counter("gradwatch_incidents_opened_total", "Incidents opened, by signature and severity",
                           ["signature", "severity"])


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """Methods outside the standard set share one label value, so a client cannot invent new series."""
    method = method if method in _METHODS else "other"
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_DURATION.labels(method, route).observe(seconds)


def record_batch(steps: int, values: int) -> None:
    """One ingested batch: `steps` newly stored steps carrying `values` measured values."""
    BATCH_STEPS.observe(steps)
    INGESTED_STEPS.inc(steps)
    INGESTED_VALUES.inc(values)


def observe_detector_seconds(seconds: float) -> None:
    DETECTOR_SECONDS.observe(seconds)


def count_incident_opened(signature: str, severity: str) -> None:
    INCIDENTS_OPENED.labels(signature, severity).inc()


def count_database_errors(engine: Engine) -> None:
    """Counts every error the database driver raises through `engine`, whichever code path met it."""

    @event.listens_for(engine, "handle_error")
    def _count(context: ExceptionContext) -> None:
        DATABASE_ERRORS.labels(type(context.original_exception).__name__).inc()


def count_database_busy() -> None:
    """SQLite's write lock held by another writer past the busy timeout: no driver error says so."""
    DATABASE_ERRORS.labels("DatabaseBusy").inc()


class _ThisProcess(Collector):
    """The default registry's metrics (this module's, plus process and Python metrics) for a single process."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def serving_registry(run_state: Collector | None = None) -> CollectorRegistry:
    """What /metrics shows: this process's metrics, or every worker's when prometheus-client's multiprocess
    directory is set, plus run state read from the database."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    if run_state is not None:
        registry.register(run_state)
    return registry

