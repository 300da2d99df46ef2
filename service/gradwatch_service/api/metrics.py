"""GET /metrics: Prometheus' text format, from prometheus-client (service health, ingest, run state).

A plain `def` route, so FastAPI runs it in the thread pool: reading run state from a slow database blocks a
worker thread, never the event loop that serves ingest.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..metrics import serving_registry
from ..run_state import RunStateCollector

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "gradwatch_run_running{...} 1.0"}}}})
def metrics(request: Request) -> Response:
    return Response(generate_latest(_registry(request)), media_type=CONTENT_TYPE_LATEST)


def _registry(request: Request) -> CollectorRegistry:
    state = request.app.state
    registry: CollectorRegistry | None = getattr(state, "metrics_registry", None)
    if registry is None:  # a race here builds two, and one is kept: harmless
        registry = serving_registry(RunStateCollector(state.engine, state.settings))
        state.metrics_registry = registry
    return registry
