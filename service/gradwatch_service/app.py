"""The application factory: settings → engine → routers. Refuses to serve an outdated schema."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from sqlalchemy import Engine
from starlette.types import ASGIApp, Receive, Scope, Send

from gradwatch.wire import VERSION

from . import __doc__ as package_doc
from .alerting.delivery import DeliveryWorker
from .alerting.metrics import count_database_errors
from .allocator import tune_malloc
from .api import health, incidents, metrics, runs, steps, summaries, tokens, webhooks
from .api.deps import AppState
from .api.errors import install_error_handlers
from .exposure import warn_if_insecure
from .pages import router as pages_router
from .request_metrics import RequestMetrics
from .schemas import RunUpsert, StepBatch
from .serving import LearnServingPort, ServedAt
from .settings import Settings, get_settings
from .storage.db import make_engine
from .storage.migrate import schema_problem
from .storage.rollup_worker import RollupWorker

__all__ = ["create_app", "SchemaOutdated"]


class SchemaOutdated(RuntimeError):
    pass


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    tune_malloc()
    settings = settings or get_settings()
    engine = engine or make_engine(settings.database_url, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        problem = schema_problem(engine)
        if problem:
            raise SchemaOutdated(problem)
        warn_if_insecure(settings.insecure)
        worker = DeliveryWorker(engine, settings, public_url=served_at.public_url).start() \
            if settings.webhook_delivery else None
        state.webhook_worker = worker
        state.rollup_worker = rollups = RollupWorker(engine, max_values=settings.max_batch_values).start()
        yield
        state.rollup_worker = None
        rollups.stop()
        if worker is not None:
            worker.stop()
        engine.dispose()

    app = FastAPI(title="gradwatch", version=VERSION, description=package_doc or "", lifespan=lifespan)
    app.state.gradwatch = state = AppState(settings, engine)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(runs.router)
    app.include_router(steps.router)
    app.include_router(incidents.router)
    app.include_router(webhooks.router)
    app.include_router(tokens.router)
    app.include_router(summaries.router)
    app.include_router(pages_router)  # the built-in run pages at /
    app.add_middleware(RejectNul)
    served_at = ServedAt(settings)
    app.add_middleware(LearnServingPort, served_at=served_at)
    if settings.metrics:  # off (GRADWATCH_METRICS=false): no /metrics, nothing counted per request or batch
        app.include_router(metrics.router)
        app.add_middleware(RequestMetrics)
        count_database_errors(engine)
    _document_raw_bodies(app)
    return app


class RejectNul:
    """A NUL character in the path or query can reach no database (PostgreSQL text refuses it): answer 422 up
    front instead of failing deep inside a query. Everything else passes straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (b"%00" in scope.get("query_string", b"") or "\x00" in scope["path"]):
            body = b'{"detail":[{"loc":["query"],"type":"value_error","msg":"NUL (%00) is not allowed in a URL"}]}'
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 422, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _document_raw_bodies(app: FastAPI) -> None:
    """Routes that read their body themselves (for size caps and gzip) still publish its schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (RunUpsert, StepBatch):
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(doc.pop("$defs", {}))
            components[model.__name__] = doc
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
