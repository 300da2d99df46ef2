"""/v1/run-summaries: the runs list with each run's latest loss and gradient norm and its open incidents (what
`gradwatch runs` and the run page's list show), in two queries per page of runs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from gradwatch.wire import RunStatus

from ..limits import InputLimits
from ..run_summaries import RunSummariesPublic, list_run_summaries
from ..schemas import MAX_STEP
from ..storage.db import read_connection
from .deps import AUTH_RESPONSES, EngineDep, LimitsDep, ReadToken, model_response

router = APIRouter(tags=["runs"], responses=AUTH_RESPONSES)


@router.get("/v1/run-summaries", summary="Runs with their latest loss, gradient norm and open incidents",
            response_model=RunSummariesPublic)
async def get_run_summaries(
    engine: EngineDep,
    principal: ReadToken,
    limits: LimitsDep,
    project: str | None = None,
    status: RunStatus | None = None,
    updated_since: Annotated[datetime | None, Query(description="ISO 8601; runs updated at or after it")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_STEP)] = 0,
) -> Response:
    return model_response(await run_in_threadpool(
        read_summaries, engine, principal.project, project, status, updated_since, limit, offset, limits))


def read_summaries(engine: Engine, bound_project: str | None, project: str | None, status: str | None,
                   updated_since: datetime | None, limit: int, offset: int,
                   limits: InputLimits | None = None) -> RunSummariesPublic:
    """A page of run summaries as a token bound to `bound_project` (None: every project) may see them."""
    if project is not None and bound_project is not None and project != bound_project:
        return RunSummariesPublic(runs=[], count=0)
    with read_connection(engine) as conn:
        rows, count = list_run_summaries(conn, project=project or bound_project, status=status,
                                         updated_since=updated_since, limit=limit, offset=offset, limits=limits)
    return RunSummariesPublic(runs=rows, count=count)
