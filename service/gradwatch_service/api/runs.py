"""/v1/runs: create or update a run (idempotent PUT), list runs, read one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from gradwatch.wire import RunStatus

from ..body import parse_body, read_body
from ..ingest import upsert_run
from ..queries import get_run, get_visible_run, list_runs
from ..schemas import MAX_STEP, RunPublic, RunsPublic, RunUpsert
from ..storage.db import read_connection, write_transaction
from .deps import AUTH_RESPONSES, EngineDep, IngestToken, LimitsDep, ReadToken, RunIdPath, SettingsDep, model_response
from .errors import INVALID, TOO_LARGE

router = APIRouter(prefix="/v1/runs", tags=["runs"], responses=AUTH_RESPONSES)


@router.put(
    "/{run_id}",
    summary="Create or update a run (idempotent)",
    response_model=RunPublic,
    status_code=200,
    responses={201: {"model": RunPublic, "description": "created"}, 200: {"description": "updated"},
               403: {"description": "the token's project is not the body's, or another project has this run id"},
               **TOO_LARGE, 415: {"description": "not JSON"}, 400: {"description": "gzip body that is not gzip"},
               **INVALID},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/RunUpsert"},
        "example": RunUpsert.model_config["json_schema_extra"]["examples"][0]}}}},  # type: ignore[index]
)
async def put_run(run_id: RunIdPath, request: Request, engine: EngineDep, settings: SettingsDep,
                  limits: LimitsDep, principal: IngestToken) -> Response:
    body = parse_body(RunUpsert, await read_body(request, settings.max_body_bytes))
    limits.check_run(name=body.name, config=body.config, meta=body.meta, layers=body.layers)
    if principal.project is not None:  # a project's token creates runs in its project, and only there
        if body.project is None:
            body = body.model_copy(update={"project": principal.project})
        elif body.project != principal.project:
            raise HTTPException(403, f"this token may only write runs of project {principal.project!r}")

    def write() -> tuple[bool, RunPublic]:
        with write_transaction(engine) as conn:
            created = upsert_run(conn, run_id, body, limits=limits, project=principal.project)
            run = get_run(conn, run_id)
            assert run is not None
            if body.config is not None or body.meta is not None:  # as read back: over the limit, rolled back
                limits.check_run(name=None, config=run.config, meta=run.meta, layers=None, stored=True)
        return created, run

    created, run = await run_in_threadpool(write)  # InvalidInput: a 422 (api/errors.py)
    return model_response(run, 201 if created else 200)


@router.get("", summary="List runs, most recently updated first", response_model=RunsPublic)
async def get_runs(
    engine: EngineDep,
    principal: ReadToken,
    limits: LimitsDep,
    project: str | None = None,
    status: RunStatus | None = None,
    updated_since: Annotated[datetime | None, Query(description="ISO 8601; runs updated at or after it")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_STEP)] = 0,
) -> Response:
    if project is not None and not principal.sees(project):
        return model_response(RunsPublic(runs=[], count=0))
    project = project or principal.project

    def read() -> RunsPublic:
        with read_connection(engine) as conn:
            rows, count = list_runs(conn, project=project, status=status, updated_since=updated_since,
                                    limit=limit, offset=offset, limits=limits)
        return RunsPublic(runs=rows, count=count)

    return model_response(await run_in_threadpool(read))


@router.get("/{run_id}", summary="One run", response_model=RunPublic,
            responses={404: {"description": "unknown run"}})
async def get_one_run(run_id: RunIdPath, engine: EngineDep, principal: ReadToken) -> Response:
    def read() -> RunPublic:
        with read_connection(engine) as conn:
            return get_visible_run(conn, run_id, principal.sees)

    return model_response(await run_in_threadpool(read))
