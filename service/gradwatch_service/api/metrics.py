"""GET /metrics: Prometheus' text format, from prometheus-client (service health, ingest, run state).

Guarded by its own token (GRADWATCH_METRICS_TOKEN) or an all-projects read token (api/deps.py). A plain
`def` route, so FastAPI runs it in the thread pool: reading run state from a slow database blocks a
worker thread, never the event loop that serves ingest.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..alerting.metrics import serving_registry
from ..alerting.run_state import RunStateCollector
from .deps import MetricsAccess, app_state

router = APIRouter(tags=["metrics"])


# Prometheus' text format, not part of the JSON API
@router.get("/metrics", include_in_schema=False, dependencies=[MetricsAccess])
def metrics(request: Request) -> Response:
    return Response(generate_latest(_registry(request)), media_type=CONTENT_TYPE_LATEST)


def _registry(request: Request) -> CollectorRegistry:
    state = app_state(request)
    if state.metrics_registry is None:  # a race here builds two, and one is kept: harmless
        state.metrics_registry = serving_registry(RunStateCollector(state.engine, state.settings))
    return state.metrics_registry
