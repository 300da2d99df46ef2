"""The service's domain errors (`errors.py`) as HTTP answers, registered once for every route; a database that
cannot be reached or written now as 503 with Retry-After, whichever route met it; and the OpenAPI description
of the 413 and 422 answers, so a client (and the schema fuzz test) knows their bodies."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import exc as sa_exc

from ..alerting.metrics import count_database_busy
from ..errors import InvalidInput, RunNotFound, RunOfAnotherProject, StepConflict
from ..limits import BatchTooLarge
from ..storage.db import DatabaseBusy
from .deps import app_state

__all__ = ["DATABASE_UNAVAILABLE", "INVALID", "STATUS", "TOO_LARGE", "ErrorAnswer", "install_error_handlers",
           "status_of"]

log = logging.getLogger("gradwatch.database")


class ErrorAnswer(BaseModel):
    detail: str | list[dict[str, Any]] = Field(
        description="what is wrong: a sentence, or FastAPI's list of {loc, msg, type}; a passed limit adds "
                    "`limit` and `setting` (type limit_exceeded)")


_LIMIT_EXAMPLE = {"detail": [{
    "loc": ["body", "config"], "type": "limit_exceeded", "limit": 65536, "setting": "GRADWATCH_MAX_CONFIG_BYTES",
    "msg": "config is 70000 bytes of JSON; the limit is 65536 bytes of JSON (GRADWATCH_MAX_CONFIG_BYTES)"}]}

INVALID: dict[int | str, dict[str, Any]] = {422: {
    "description": "invalid input, or an input limit passed: each error names where (`loc`); a limit's also "
                   "names the limit and its setting",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"},
                                     "example": _LIMIT_EXAMPLE}}}}
TOO_LARGE: dict[int | str, dict[str, Any]] = {413: {
    "description": "the body is over GRADWATCH_MAX_BODY_BYTES (on the wire or inflated), or a batch over "
                   "GRADWATCH_MAX_BATCH_STEPS: send less at a time",
    "model": ErrorAnswer,
    "content": {"application/json": {"example": {
        "detail": "request body is 17000000 bytes; the limit is 16777216 bytes (GRADWATCH_MAX_BODY_BYTES)"}}}}}

DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,  # refused, cut, timed out, locked (SQLite), shutting down, deadlock (PostgreSQL)
    sa_exc.InterfaceError,  # a connection the driver already knows is closed
    sa_exc.TimeoutError,  # no pooled connection within db_busy_timeout_s
    DatabaseBusy,  # SQLite's write lock held elsewhere longer than db_busy_timeout_s
)
"""Errors that say the database cannot serve the request now, not that the request or the code is wrong: a retry
later can succeed, so they are 503s that say when to retry, never 500s."""


STATUS: tuple[tuple[type[Exception], int], ...] = (
    (BatchTooLarge, 413),  # before InvalidInput, which it is
    (InvalidInput, 422),
    (RunNotFound, 404),
    (RunOfAnotherProject, 403),
    (StepConflict, 409),
)
"""Each domain error's status code: the one place that knows them (errors.py, limits.py and queries.py don't)."""


def status_of(exc: Exception) -> int:
    return next(code for kind, code in STATUS if isinstance(exc, kind))


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    """A domain error's answer: its status, and a body FastAPI's own errors also have (`detail`)."""
    detail: Any
    if isinstance(exc, InvalidInput):
        detail = exc.errors
    elif isinstance(exc, StepConflict):
        detail = {"message": str(exc), "steps": exc.steps}
    else:
        detail = str(exc)
    return JSONResponse({"detail": detail}, status_code=status_of(exc))


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The driver's message stays in the log (it can name hosts and ports); the client hears the kind and when to
    come back. Driver errors are already counted by `count_database_errors`; the writers' lock is counted here."""
    state = app_state(request)
    if isinstance(exc, DatabaseBusy) and state.settings.metrics:
        count_database_busy()
    kind = type(getattr(exc, "orig", None) or exc).__name__
    log.warning("database unavailable for %s %s: %s", request.method, request.url.path, exc)
    retry_after = state.settings.db_retry_after_s
    return JSONResponse({"detail": f"database unavailable ({kind}); retry in {retry_after} s"}, status_code=503,
                        headers={"Retry-After": str(retry_after)})


def install_error_handlers(app: FastAPI) -> None:
    for kind, _ in STATUS:
        app.add_exception_handler(kind, _domain_error)
    for kind in DATABASE_UNAVAILABLE:
        app.add_exception_handler(kind, _database_unavailable)
