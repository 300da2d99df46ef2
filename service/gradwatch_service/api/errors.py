"""The service's domain errors (`errors.py`) as HTTP answers, registered once for every route."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import InvalidInput, RunNotFound, StepConflict

__all__ = ["install_error_handlers"]


async def _invalid_input(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidInput)
    return JSONResponse({"detail": exc.errors}, status_code=exc.status_code)


async def _run_not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _step_conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StepConflict)
    return JSONResponse({"detail": {"message": str(exc), "steps": exc.steps}}, status_code=409)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(InvalidInput, _invalid_input)
    app.add_exception_handler(RunNotFound, _run_not_found)
    app.add_exception_handler(StepConflict, _step_conflict)
