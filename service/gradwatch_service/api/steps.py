"""/v1/runs/{run_id}/steps and /series: append step batches, read them back, downsampled series."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from ..alerting.metrics import count_incident_opened, observe_detector_seconds, record_batch
from ..binary_batch import parse_binary_batch
from ..body import BINARY_CONTENT_TYPE, content_type_of, parse_body, read_body
from ..errors import InvalidInput
from ..ingest import BatchOutcome, append_steps
from ..queries import default_steps_limit, list_incidents, read_series, read_steps, visible_run_row
from ..schemas import MAX_STEP, SERIES_FIELDS, Incident, IngestResult, SeriesPublic, StepBatch, StepsPublic
from ..storage.db import read_connection, write_transaction
from ..storage.steps_table import StepColumns
from .chunked import chunked_response
from .deps import (
    AUTH_RESPONSES,
    DetectorDep,
    EngineDep,
    IngestSlotsDep,
    IngestToken,
    LimitsDep,
    ReadToken,
    RunIdPath,
    SettingsDep,
    app_state,
    model_response,
)
from .errors import INVALID, TOO_LARGE

router = APIRouter(prefix="/v1/runs/{run_id}", tags=["steps"], responses=AUTH_RESPONSES)

_BATCH_EXAMPLE = StepBatch.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]


@router.post(
    "/steps",
    summary="Append a batch of steps (idempotent on run and step)",
    response_model=IngestResult,
    responses={
        404: {"description": "unknown run (or another project's): PUT it first"},
        409: {"description": "a stored step was resent with different values; nothing was stored",
              "content": {"application/json": {"example": {"detail": {
                  "message": "1 step(s) of run 'r1' were already stored with different values", "steps": [3]}}}}},
        **TOO_LARGE,
        415: {"description": "unsupported Content-Type or Content-Encoding"},
        400: {"description": "gzip body that is not gzip"},
        **INVALID,
    },
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/StepBatch"}, "example": _BATCH_EXAMPLE},
        BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary",
                                         "description": "columns of little-endian numbers (docs/wire.md)"}}}}},
)
async def post_steps(run_id: RunIdPath, request: Request, engine: EngineDep, settings: SettingsDep,
                     detector: DetectorDep, ingest_slots: IngestSlotsDep, limits: LimitsDep,
                     principal: IngestToken) -> Response:
    raw = await read_body(request, settings.max_body_bytes, binary=True)
    binary = content_type_of(request) == BINARY_CONTENT_TYPE

    def ingest() -> IngestResult:
        batch: StepBatch | StepColumns
        if binary:
            batch = parse_binary_batch(raw, limits)
        else:  # parsing is what costs memory (a Python object a value): count the items before it
            limits.check_batch_values(raw.count(b",") + 1, about=True)
            batch = parse_body(StepBatch, raw)
            limits.check_batch(len(batch.steps), batch.layers, (s.scalars for s in batch.steps))
        rollups = app_state(request).rollup_worker
        with write_transaction(engine) as conn:
            outcome = append_steps(conn, run_id, batch, detector, limits=limits, project=principal.project,
                                   defer_rollups=rollups is not None)
            open_now, _ = list_incidents(conn, run_pk=outcome.run_pk, status="open")
            raised: list[Incident] = []
            if outcome.raised_incidents:
                raised, _ = list_incidents(conn, run_pk=outcome.run_pk, seqs=outcome.raised_incidents)
        if rollups is not None and outcome.rollups_waiting:
            rollups.note(outcome.run_pk, outcome.new_steps)
        if settings.metrics:
            _count_ingested(outcome)  # committed: a batch rolled back is not counted
        return IngestResult(run_id=run_id, accepted=outcome.accepted, duplicates=outcome.duplicates,
                            last_step=outcome.last_step, open_incidents=open_now, raised_incidents=raised)

    async with ingest_slots:  # RunNotFound, StepConflict, InvalidInput: answered by api/errors.py
        result = await run_in_threadpool(ingest)
    return model_response(result)


@router.get("/steps", summary="A run's steps as stored, ascending", response_model=StepsPublic,
            responses={404: {"description": "unknown run"},
                       422: {"description": "an answer over GRADWATCH_MAX_RESPONSE_VALUES: ask fewer steps"}})
async def get_steps(
    run_id: RunIdPath,
    engine: EngineDep,
    principal: ReadToken,
    limits: LimitsDep,
    start: Annotated[int | None, Query(ge=0, le=MAX_STEP, description="first step, inclusive")] = None,
    end: Annotated[int | None, Query(ge=0, le=MAX_STEP, description="last step, inclusive")] = None,
    limit: Annotated[int | None, Query(ge=1, le=100_000, description=(
        "most steps; when absent 10,000, or fewer for a run so wide that 10,000 steps would pass "
        "GRADWATCH_MAX_RESPONSE_VALUES (a limit asked for that would pass it is a 422)"))] = None,
) -> Response:
    def read() -> StepsPublic:
        with read_connection(engine) as conn:
            run = visible_run_row(conn, run_id, principal.sees)
            n_layers = len(run.layer_names)
            page = limit if limit is not None else default_steps_limit(n_layers, limits)
            rows = read_steps(conn, run.id, start=start, end=end, limit=page, n_layers=n_layers, limits=limits)
        return StepsPublic(run_id=run_id, layers=list(run.layer_names), steps=rows)

    return await run_in_threadpool(chunked_response, await run_in_threadpool(read), "steps")


@router.get(
    "/series",
    summary="Series of chosen fields and layers over a step range, downsampled keeping spikes",
    response_model=SeriesPublic,
    responses={404: {"description": "unknown run"},
               422: {"description": "unknown or repeated field or layer, or an answer over a limit"}},
)
async def get_series(
    run_id: RunIdPath,
    engine: EngineDep,
    principal: ReadToken,
    limits: LimitsDep,
    fields: Annotated[str, Query(description=f"comma-separated, of {', '.join(SERIES_FIELDS)}",
                                 examples=["loss,grad_norm,layer_grad_norms"])] = "loss,grad_norm",
    layers: Annotated[str | None, Query(description="comma-separated layer names for per-layer fields; "
                                                    "all layers when absent")] = None,
    start: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
    end: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
    max_points: Annotated[int | None, Query(ge=2, le=100_000, description=(
        "downsample to about this many points per series: each bucket keeps its min and max and every kind "
        "of non-finite value it holds"))] = None,
) -> Response:
    field_list = [f.strip() for f in fields.split(",") if f.strip()]
    unknown = [f for f in field_list if f not in SERIES_FIELDS]
    if unknown or not field_list:
        raise InvalidInput(["query", "fields"], f"unknown field(s) {unknown}; choose from {list(SERIES_FIELDS)}")
    limits.check_query_names(["query", "fields"], field_list, "field", None)
    layer_list = None if layers is None else [name for name in layers.split(",") if name]
    if layer_list is not None:
        limits.check_query_names(["query", "layers"], layer_list, "layer")

    def read() -> SeriesPublic:
        with read_connection(engine) as conn:
            run = visible_run_row(conn, run_id, principal.sees)
            series = read_series(conn, run.id, list(run.layer_names), fields=field_list, layers=layer_list,
                                 start=start, end=end, max_points=max_points, limits=limits)
        return SeriesPublic(run_id=run_id, start=start, end=end, max_points=max_points, series=series)

    # an unknown layer: UnknownLayer, a 422
    return await run_in_threadpool(chunked_response, await run_in_threadpool(read), "series")


def _count_ingested(outcome: BatchOutcome) -> None:
    """The ingest metrics of one committed batch."""
    if outcome.accepted:
        record_batch(steps=outcome.accepted, values=outcome.measured_values)
    if outcome.detector_seconds is not None:
        observe_detector_seconds(outcome.detector_seconds)
    for signature, severity in outcome.opened_incidents:
        count_incident_opened(signature, severity)
