"""The wire shapes of /v1 (docs/wire.md), as pydantic models. Validation happens here, once, in Rust.

Measured values are `Value`: a JSON number or one of "NaN", "Infinity", "-Infinity". Serialised back with
`ser_json_inf_nan="strings"`, so what comes out is what went in.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from gradwatch.wire import LAYER_FIELDS, NONFINITE_STRINGS, SCALAR_FIELDS, RunStatus

MAX_STEP = 2**62
"""Steps, offsets and limits stay below this: it fits SQLite's and PostgreSQL's 64-bit integers."""
ProjectName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
LayerName = Annotated[str, StringConstraints(min_length=1)]
"""Lengths and counts a setting bounds (names, layers, scalars, config size) are checked by limits.py, which
names the setting in its 422; the models hold only what no setting changes."""
ScalarName = Annotated[str, StringConstraints(min_length=1)]

Value = Annotated[
    float,
    WithJsonSchema({
        "anyOf": [{"type": "number"}, {"type": "string", "enum": list(NONFINITE_STRINGS)}],
        "description": 'a number, or "NaN", "Infinity", "-Infinity" for the non-finite values',
    }),
]
"""A measured value: a JSON number or one of the strings "NaN", "Infinity", "-Infinity" (the protobuf JSON
convention), on the way in and on the way out (`ser_json_inf_nan="strings"`)."""


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class RunUpsert(WireModel):
    """PUT /v1/runs/{run_id}. Omitted fields are left as they are."""

    project: ProjectName | None = Field(default=None, description="defaults to 'default' on creation")
    name: str | None = None
    config: dict[str, Any] | None = None
    status: RunStatus | None = None
    layers: list[LayerName] | None = None
    meta: dict[str, Any] | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "project": "vision",
                    "name": "resnet50-lr0.4",
                    "config": {"lr": 0.4},
                    "status": "running",
                    "layers": ["conv1.weight", "fc.weight"],
                }
            ]
        },
    )


class RunPublic(WireModel):
    run_id: str
    project: str
    name: str | None
    status: RunStatus
    config: dict[str, Any] | None
    meta: dict[str, Any] | None
    layers: list[str]
    n_layers: int
    last_step: int | None
    n_steps: int
    created_at: datetime
    updated_at: datetime

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "run_id": "resnet50-7f3a",
                    "project": "vision",
                    "name": "resnet50-lr0.4",
                    "status": "running",
                    "config": {"lr": 0.4},
                    "meta": None,
                    "layers": ["conv1.weight", "fc.weight"],
                    "n_layers": 2,
                    "last_step": 1999,
                    "n_steps": 2000,
                    "created_at": "2026-11-26T10:00:00Z",
                    "updated_at": "2026-11-26T10:20:00Z",
                }
            ]
        }
    )


class RunListed(WireModel):
    """A run as a list shows it: its layer count, not its layer names (up to GRADWATCH_MAX_RUN_LAYERS of them:
    a page of such runs could be hundreds of megabytes); GET /v1/runs/{run_id} has the names."""

    run_id: str
    project: str
    name: str | None
    status: RunStatus
    config: dict[str, Any] | None
    meta: dict[str, Any] | None
    n_layers: int
    last_step: int | None
    n_steps: int
    created_at: datetime
    updated_at: datetime


class RunsPublic(WireModel):
    runs: list[RunListed]
    count: int

    model_config = ConfigDict(json_schema_extra={"examples": [{"runs": [], "count": 0}]})


def _finite_time(t: float | None) -> float | None:
    if t is not None and not math.isfinite(t):
        raise ValueError("time must be a finite number of unix seconds")
    return t


class StepIn(WireModel):
    step: int = Field(ge=0, le=MAX_STEP)
    time: Annotated[float | None, AfterValidator(_finite_time)] = None
    loss: Value | None = None
    grad_norm: Value | None = None
    lr: Value | None = None
    update_norm: Value | None = None
    layer_grad_norms: list[Value | None] | None = None
    layer_weight_norms: list[Value | None] | None = None
    layer_update_norms: list[Value | None] | None = None
    scalars: dict[ScalarName, Value | None] | None = None
    skipped: bool = False


class BinaryBatchHeader(WireModel):
    """The JSON header of a binary step batch (docs/wire.md); the columns follow it."""

    n: int = Field(ge=0, description="steps in the batch")
    fields: list[str] = Field(description="the sections that follow, in order; 'step' is required (the framing "
                                          "check, gradwatch.wire.split_binary_batch, knows their names)")
    batch_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    layers: list[LayerName] | None = None
    scalars: list[dict[ScalarName, Value | None] | None] | None = Field(
        default=None, description="one entry per step (an object or null)")


class StepBatch(WireModel):
    """POST /v1/runs/{run_id}/steps."""

    batch_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    layers: list[LayerName] | None = None
    steps: list[StepIn]

    model_config = ConfigDict(
        extra="forbid",
        ser_json_inf_nan="strings",
        json_schema_extra={
            "examples": [
                {
                    "batch_id": "3f1c9a",
                    "layers": ["fc1.weight", "fc2.weight"],
                    "steps": [
                        {
                            "step": 0,
                            "loss": 2.31,
                            "grad_norm": 14.2,
                            "lr": 0.001,
                            "update_norm": 0.013,
                            "layer_grad_norms": [14.1, 0.9],
                            "layer_weight_norms": [8.0, 0.2],
                        },
                        {"step": 1, "loss": "NaN", "grad_norm": "Infinity", "layer_grad_norms": ["Infinity", 0.8]},
                    ],
                }
            ]
        },
    )


class Incident(WireModel):
    """An explosion signature that fired on a run: open while it keeps firing, resolved after it went quiet."""

    id: str = Field(description="run_id#seq, stable")
    run_id: str
    project: str
    seq: int = Field(description="1, 2, ... within the run")
    signature: str = Field(description="nonfinite, grad_spike, grad_growth, loss_divergence or update_ratio")
    severity: Literal["warning", "critical"]
    status: Literal["open", "resolved"]
    opened_step: int
    last_step: int = Field(description="the last step at which the signature fired")
    resolved_step: int | None
    layer: str | None = Field(description="root cause: the layer whose norm broke out of its band first")
    value: Value | None
    baseline: Value | None = Field(description="the band or limit the value broke")
    message: str
    evidence: dict[str, Any] | None
    opened_at: datetime
    updated_at: datetime
    resolved_at: datetime | None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "resnet50-7f3a#1",
                    "run_id": "resnet50-7f3a",
                    "project": "vision",
                    "seq": 1,
                    "signature": "grad_growth",
                    "severity": "critical",
                    "status": "open",
                    "opened_step": 1840,
                    "last_step": 1851,
                    "resolved_step": None,
                    "layer": "layer4.2.conv3.weight",
                    "value": 412.5,
                    "baseline": 3.1,
                    "message": "grad norm grew 130x over 12 steps",
                    "evidence": {"opened": {"step": 1840}},
                    "opened_at": "2026-11-26T10:18:00Z",
                    "updated_at": "2026-11-26T10:18:30Z",
                    "resolved_at": None,
                }
            ]
        }
    )


class IncidentsPublic(WireModel):
    incidents: list[Incident]
    count: int

    model_config = ConfigDict(json_schema_extra={"examples": [{"incidents": [], "count": 0}]})


class IngestResult(WireModel):
    run_id: str
    accepted: int = Field(description="steps stored by this request")
    duplicates: int = Field(description="steps already stored with identical values (resends)")
    last_step: int | None = Field(description="highest step stored for the run")
    open_incidents: list[Incident] = Field(default_factory=list, description="the run's incidents open now")
    raised_incidents: list[Incident] = Field(
        default_factory=list,
        description="incidents this batch opened or escalated, even those its later steps already resolved: "
        "a job that sends a long batch still hears of every alarm",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"run_id": "resnet50-7f3a", "accepted": 998, "duplicates": 2, "last_step": 1999, "open_incidents": []}
            ]
        }
    )


class StepOut(WireModel):
    step: int
    time: float
    loss: Value | None
    grad_norm: Value | None
    lr: Value | None
    update_norm: Value | None
    layer_grad_norms: list[Value | None] | None
    layer_weight_norms: list[Value | None] | None
    layer_update_norms: list[Value | None] | None
    scalars: dict[str, Value | None] | None
    skipped: bool
    late: bool


class StepsPublic(WireModel):
    run_id: str
    layers: list[str]
    steps: list[StepOut]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "run_id": "r1",
                    "layers": ["fc1.weight"],
                    "steps": [
                        {
                            "step": 0,
                            "time": 1764151200.0,
                            "loss": "NaN",
                            "grad_norm": "Infinity",
                            "lr": 0.001,
                            "update_norm": None,
                            "layer_grad_norms": ["Infinity"],
                            "layer_weight_norms": [8.0],
                            "layer_update_norms": None,
                            "scalars": None,
                            "skipped": False,
                            "late": False,
                        }
                    ],
                }
            ]
        }
    )


SERIES_FIELDS = (*SCALAR_FIELDS, *LAYER_FIELDS)


class Series(WireModel):
    field: str
    layer: str | None
    steps: list[int]
    values: list[Value | None]


class SeriesPublic(WireModel):
    run_id: str
    start: int | None
    end: int | None
    max_points: int | None
    series: list[Series]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "run_id": "r1",
                    "start": 0,
                    "end": 999,
                    "max_points": 4,
                    "series": [
                        {
                            "field": "grad_norm",
                            "layer": None,
                            "steps": [3, 410, 512, 999],
                            "values": [0.8, 2900.0, 0.7, "NaN"],
                        }
                    ],
                }
            ]
        }
    )
