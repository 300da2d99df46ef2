"""Runs with what a person scanning a list wants next to each: its latest loss and gradient norm, and how many
incidents it has open. One query for the runs, one for their open incidents, whatever the page size.

"Latest" is the latest *measured* value (a client may log the loss less often than the gradients), looked for
among the run's last `LATEST_WITHIN` steps only: one short index range per run, never a scan of a long run.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import ConfigDict
from sqlalchemy import Connection, func, select

from .limits import InputLimits
from .queries import list_runs
from .schemas import RunListed, Value, WireModel
from .storage.models import incidents, runs, steps

__all__ = ["LATEST_WITHIN", "RunSummary", "RunSummariesPublic", "list_run_summaries"]

LATEST_WITHIN = 4096
"""How far back from a run's last step its latest loss and gradient norm are looked for."""


class RunSummary(RunListed):
    loss: Value | None = None
    """the latest measured loss (within the last LATEST_WITHIN steps)"""
    grad_norm: Value | None = None
    """the latest measured total gradient norm (within the last LATEST_WITHIN steps)"""
    open_warnings: int = 0
    open_criticals: int = 0


class RunSummariesPublic(WireModel):
    runs: list[RunSummary]
    count: int

    model_config = ConfigDict(json_schema_extra={"examples": [{"runs": [{
        "run_id": "resnet50-7f3a", "project": "vision", "name": "resnet50-lr0.4", "status": "running",
        "config": {"lr": 0.4}, "meta": None, "n_layers": 2, "last_step": 1999,
        "n_steps": 2000, "created_at": "2026-11-26T10:00:00Z", "updated_at": "2026-11-26T10:20:00Z",
        "loss": "NaN", "grad_norm": "Infinity", "open_warnings": 0, "open_criticals": 1}], "count": 1}]})


def list_run_summaries(conn: Connection, *, project: str | None = None, status: str | None = None,
                       updated_since: datetime | None = None, limit: int = 100,
                       offset: int = 0, limits: InputLimits | None = None) -> tuple[list[RunSummary], int]:
    """`list_runs` (bounded by `limits` as it bounds them), each run with its latest values and open incident
    counts."""
    listed, count = list_runs(conn, project=project, status=status, updated_since=updated_since, limit=limit,
                              offset=offset, limits=limits)
    if not listed:
        return [], count
    ids = [r.run_id for r in listed]

    def latest(column: Any) -> Any:
        return (select(column).where(steps.c.run_pk == runs.c.id, column.is_not(None),
                                     steps.c.step >= runs.c.last_step - LATEST_WITHIN)
                .order_by(steps.c.step.desc()).limit(1).scalar_subquery())

    values = {r.run_id: r for r in conn.execute(
        select(runs.c.run_id, latest(steps.c.loss).label("loss"), latest(steps.c.grad_norm).label("grad_norm"))
        .where(runs.c.run_id.in_(ids)))}
    counts: dict[tuple[str, str], int] = {}
    for run_id, severity, n in conn.execute(
            select(runs.c.run_id, incidents.c.severity, func.count())
            .select_from(incidents.join(runs, runs.c.id == incidents.c.run_pk))
            .where(incidents.c.status == "open", runs.c.run_id.in_(ids))
            .group_by(runs.c.run_id, incidents.c.severity)):
        counts[(run_id, severity)] = int(n)
    out = []
    for r in listed:
        v = values.get(r.run_id)
        out.append(RunSummary(**dict(r), loss=_real(v.loss) if v else None,
                              grad_norm=_real(v.grad_norm) if v else None,
                              open_warnings=counts.get((r.run_id, "warning"), 0),
                              open_criticals=counts.get((r.run_id, "critical"), 0)))
    return out, count


def _real(value: Any) -> float | None:
    """A scalar as read through a subquery: SQLite hands back its stored text 'NaN' as it is."""
    return None if value is None else float(value)

