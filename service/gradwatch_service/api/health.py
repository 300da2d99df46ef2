"""Liveness and readiness: /healthz says the process serves, /readyz that the database is usable.

/healthz never touches the database: a database outage must not get a healthy process restarted. /readyz reads
the database and checks its schema; on SQLite it also takes the write lock for an empty transaction, since
readers keep working while another writer holds it and ingest cannot.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from ..exposure import INSECURE_WARNING
from ..storage.db import write_transaction
from ..storage.dialect import storage_dialect
from ..storage.migrate import schema_problem
from .deps import EngineDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up", responses={200: {"content": {"application/json": {
    "example": {"status": "ok"}}}}})
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database is reachable and its schema current",
            responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}},
                       503: {"description": "not ready", "content": {"application/json": {
                "example": {"status": "unavailable", "database": "postgresql",
                            "detail": "database unreachable: ..."}}}}})
async def readyz(engine: EngineDep, settings: SettingsDep) -> JSONResponse:
    def check() -> str | None:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any failure means not ready, and says why
            return f"database unreachable: {type(exc).__name__}: {exc}"
        try:
            problem = schema_problem(engine)
            if problem is None and storage_dialect(engine).ready_takes_write_lock:
                with write_transaction(engine):
                    pass
            return problem
        except Exception as exc:  # noqa: BLE001
            return f"database not writable: {type(exc).__name__}: {exc}"

    problem = await run_in_threadpool(check)
    warning = {"insecure": True, "warning": INSECURE_WARNING} if settings.insecure else {}
    if problem:
        return JSONResponse({"status": "unavailable", "database": engine.dialect.name, "detail": problem,
                             **warning}, status_code=503)
    return JSONResponse({"status": "ok", "database": engine.dialect.name, **warning})
