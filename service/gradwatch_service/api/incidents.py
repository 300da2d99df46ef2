"""/v1/incidents and /v1/runs/{run_id}/incidents: what the detectors found, with evidence."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from ..queries import list_incidents, visible_run_row
from ..schemas import MAX_STEP, IncidentsPublic
from ..storage.db import read_connection
from .deps import AUTH_RESPONSES, EngineDep, ReadToken, RunIdPath, model_response

router = APIRouter(tags=["incidents"], responses=AUTH_RESPONSES)

Status = Annotated[Literal["open", "resolved"] | None, Query(description="open or resolved; both when absent")]
Severity = Annotated[Literal["warning", "critical"] | None, Query()]
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=MAX_STEP)]


@router.get("/v1/incidents", summary="Incidents across runs, most recently updated first",
            response_model=IncidentsPublic)
async def get_incidents(engine: EngineDep, principal: ReadToken, project: str | None = None,
                        run_id: str | None = None, status: Status = None, severity: Severity = None,
                        limit: Limit = 100, offset: Offset = 0) -> Response:
    if project is not None and not principal.sees(project):
        return model_response(IncidentsPublic(incidents=[], count=0))
    project = project or principal.project

    def read() -> IncidentsPublic:
        with read_connection(engine) as conn:
            rows, count = list_incidents(conn, project=project, run_id=run_id, status=status, severity=severity,
                                         limit=limit, offset=offset)
        return IncidentsPublic(incidents=rows, count=count)

    return model_response(await run_in_threadpool(read))


@router.get("/v1/runs/{run_id}/incidents", summary="One run's incidents with their evidence",
            response_model=IncidentsPublic, responses={404: {"description": "unknown run"}})
async def get_run_incidents(run_id: RunIdPath, engine: EngineDep, principal: ReadToken, status: Status = None,
                            severity: Severity = None, limit: Limit = 100, offset: Offset = 0) -> Response:
    def read() -> IncidentsPublic:
        with read_connection(engine) as conn:
            run = visible_run_row(conn, run_id, principal.sees)
            rows, count = list_incidents(conn, run_pk=run.id, status=status, severity=severity, limit=limit,
                                         offset=offset)
        return IncidentsPublic(incidents=rows, count=count)

    return model_response(await run_in_threadpool(read))
