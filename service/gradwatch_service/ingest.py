"""Writes: create/update runs and append step batches, idempotently, in one transaction each.

Appending a batch, in the caller's write transaction:
1. lock the run row (`FOR UPDATE` on PostgreSQL; SQLite holds the database write lock already);
2. check every step's per-layer arrays against the layer count and put them in the run's layer order
   (appending new layer names): after this nothing is left to reject but conflicts;
3. compare steps that may already be stored with what is stored: identical ones are duplicates (a resend),
   different ones make the whole batch a 409 and nothing is written;
4. insert the new steps (steps_table), advance the run's counters, and, with detection on, its detector state
   and incidents (see detection.py).
The caller commits, then acknowledges: a 2xx means durable. A binary batch of new, ascending steps in the
run's layer order has nothing to check, map or compare: it is stored as its columns; any other binary batch is
turned into the JSON model first and takes these same steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Row, Table, select, update

from gradwatch.detect import DetectorConfig
from gradwatch.wire import LAYER_FIELDS, SCALAR_FIELDS, jsonable

from .errors import InvalidInput, RunNotFound, RunOfAnotherProject, StepConflict
from .incidents import advance_detection, close_open_incident
from .limits import InputLimits
from .schemas import RunUpsert, StepBatch, StepIn
from .storage.db import now_utc
from .storage.dialect import decode_scalars, storage_dialect
from .storage.models import FLAG_SKIPPED, projects, runs
from .storage.rollups import roll_up_batch
from .storage.steps_table import LayerRow, StepColumns, insert_rows, stored_steps

__all__ = ["BatchOutcome", "upsert_run", "append_steps"]

_COMPARED = (*SCALAR_FIELDS, "skipped", *LAYER_FIELDS, "scalars")
"""What a resend must repeat exactly; `time` is not in it (the service stamps it when the client sent none)."""


@dataclass(frozen=True)
class LockedRun:
    """The run row as ingest reads it, under the run's lock."""

    id: int
    layer_names: list[str]
    last_step: int | None
    n_steps: int
    detector_state: dict[str, Any] | None
    project_id: int


@dataclass
class BatchOutcome:
    run_pk: int
    accepted: int
    duplicates: int
    last_step: int | None
    raised_incidents: list[int] = field(default_factory=list)
    measured_values: int = 0
    """values the new steps carried (scalars and per-layer norms), for the ingest metrics"""
    detector_seconds: float | None = None
    """how long the detectors took over the batch; None when they did not run"""
    opened_incidents: list[tuple[str, str]] = field(default_factory=list)
    """(signature, severity) of every incident the batch opened (escalations not counted)"""
    rollups_waiting: bool = False
    """some of the new steps were left to the rollup worker (`defer_rollups`)"""
    new_steps: tuple[StepColumns, int] | None = None
    """the new steps and the run's layer count, when all of them were left to the rollup worker: what it merges
    without reading them back"""


# ---------------------------------------------------------------------------------------------------- runs

def _insert_if_new(conn: Connection, table: Table, key: str, values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT (key) DO NOTHING; True when the row is new. Two PostgreSQL transactions may create the
    same project or run at once; SQLite's writers never race."""
    statement = storage_dialect(conn).insert_skipping(table, key).values(**values).returning(table.c.id)
    return conn.execute(statement).first() is not None


def _project_id(conn: Connection, name: str) -> int:
    pid = conn.execute(select(projects.c.id).where(projects.c.name == name)).scalar()
    if pid is None:
        _insert_if_new(conn, projects, "name", {"name": name})
        pid = conn.execute(select(projects.c.id).where(projects.c.name == name)).scalar_one()
    return int(pid)


def _merge_layers(current: list[str], incoming: Sequence[str]) -> list[str]:
    known = set(current)
    return current + [name for name in incoming if name not in known]


def upsert_run(conn: Connection, run_id: str, body: RunUpsert, *, limits: InputLimits | None = None,
               project: str | None = None) -> bool:
    """Create the run or update the fields the body carries. Returns True when it was created. With `limits`,
    the run's layer list after the update is held to them (the body's own fields are the caller's to check).
    With `project` (the caller's token is bound to it), a run of another project raises RunOfAnotherProject."""
    if body.layers is not None and len(set(body.layers)) != len(body.layers):
        raise InvalidInput(["body", "layers"], "layer names must be unique")
    now = now_utc()
    row = _lock_run(conn, run_id)
    if row is None:
        created = _insert_if_new(conn, runs, "run_id", {
            "run_id": run_id,
            "project_id": _project_id(conn, body.project or "default"),
            "name": body.name,
            "status": body.status or "running",
            "config": jsonable(body.config),
            "meta": jsonable(body.meta),
            "layer_names": list(body.layers or []),
            "n_steps": 0,
            "created_at": now,
            "updated_at": now,
        })
        if created:
            return True
        row = _lock_run(conn, run_id)  # a concurrent PUT created it first: update it instead
        assert row is not None
    if not _in_project(conn, row, project):
        raise RunOfAnotherProject(run_id)
    changes: dict[str, Any] = {}
    if body.project is not None:
        changes["project_id"] = _project_id(conn, body.project)
    for name in ("name", "status"):
        if getattr(body, name) is not None:
            changes[name] = getattr(body, name)
    for name in ("config", "meta"):
        if getattr(body, name) is not None:
            changes[name] = jsonable(getattr(body, name))
    if body.layers is not None:
        current = list(row.layer_names)
        if body.layers[: len(current)] != current and current[: len(body.layers)] != body.layers:
            raise InvalidInput(["body", "layers"], "layers may only be appended to: the run already has "
                                                   f"{len(current)} layers starting {current[:3]}")
        changes["layer_names"] = _merge_layers(current, body.layers)
        if limits is not None:
            limits.check_run_layers(["body", "layers"], len(changes["layer_names"]))
    if changes.get("status", "running") != "running":  # the run ended: no step will come to resolve its incident
        closed = close_open_incident(conn, row.id, row.detector_state, f"run {changes['status']}")
        if closed is not None:
            changes["detector_state"] = closed
    if changes:
        changes["updated_at"] = now
        conn.execute(update(runs).where(runs.c.id == row.id).values(**changes))
    return False


def _lock_run(conn: Connection, run_id: str) -> LockedRun | None:
    """The run's row, locked for this transaction (SQLite renders no FOR UPDATE: its writer holds the lock)."""
    q = select(runs.c.id, runs.c.layer_names, runs.c.last_step, runs.c.n_steps, runs.c.detector_state,
               runs.c.project_id).where(runs.c.run_id == run_id).with_for_update()
    row = conn.execute(q).first()
    return None if row is None else LockedRun(*row)


def _in_project(conn: Connection, run: LockedRun, project: str | None) -> bool:
    """Is the locked run in this project? (None: no constraint, every project will do.)"""
    if project is None:
        return True
    return conn.execute(select(projects.c.name).where(projects.c.id == run.project_id)).scalar() == project


# --------------------------------------------------------------------------------------------------- steps

def _layer_mapper(run_layers: list[str], batch_layers: list[str] | None) -> tuple[list[str], list[int] | None]:
    """The run's (possibly extended) layer list and, where the batch's order differs, the index map."""
    if batch_layers is None:
        return run_layers, None
    if len(set(batch_layers)) != len(batch_layers):
        raise InvalidInput(["body", "layers"], "layer names must be unique")
    if run_layers[: len(batch_layers)] == batch_layers:
        return run_layers, None
    if batch_layers[: len(run_layers)] == run_layers:
        return list(batch_layers), None
    merged = _merge_layers(run_layers, batch_layers)
    position = {name: i for i, name in enumerate(merged)}
    return merged, [position[name] for name in batch_layers]


def _layer_arrays(batch: StepBatch, n_run_layers: int, index_map: list[int] | None) -> dict[str, list[LayerRow | None]]:
    """Every step's per-layer arrays, checked against the layer count and placed in the run's layer order.

    This is the batch's one check beyond its schema, and it runs before anything compares or stores a step:
    a wrong length must be a 422 here, not an error half-way through comparing a resend."""
    n_batch_layers = len(batch.layers) if batch.layers is not None else None
    arrays: dict[str, list[LayerRow | None]] = {}
    for name in LAYER_FIELDS:
        column: list[LayerRow | None] = [getattr(s, name) for s in batch.steps]
        for i, values in enumerate(column):
            if values is None:
                continue
            if n_batch_layers is not None:
                if len(values) != n_batch_layers:
                    raise InvalidInput(["body", "steps", i, name],
                                       f"has {len(values)} values but there are {n_batch_layers} layers")
            elif len(values) > n_run_layers:
                raise InvalidInput(["body", "steps", i, name],
                                   f"has {len(values)} values but the run has {n_run_layers} layers: "
                                   "send `layers` with the batch or the run")
            if index_map is not None:
                placed: LayerRow = [None] * n_run_layers
                for k, v in zip(index_map, values, strict=True):
                    placed[k] = v
                column[i] = placed
        arrays[name] = column
    return arrays


def _canon(x: Any) -> Any:
    """A comparable form of a stored or sent value: NaN equals NaN, trailing unmeasured layers don't count, and
    an array with no measured value equals an absent one (a binary body cannot tell them apart)."""
    if isinstance(x, float) and x != x:
        return "NaN"
    if isinstance(x, (list, tuple)):
        out = [_canon(v) for v in x]
        while out and out[-1] is None:
            out.pop()
        return tuple(out) or None
    if isinstance(x, dict):
        return tuple(sorted((k, _canon(v)) for k, v in x.items()))
    return x


def _sent_key(step: StepIn, arrays: dict[str, list[LayerRow | None]], i: int) -> tuple[Any, ...]:
    """The `i`-th step of the batch as a resend is compared (per-layer values in the run's order)."""
    return tuple(_canon(arrays[name][i] if name in arrays else getattr(step, name)) for name in _COMPARED)


def _stored_key(row: Row[Any]) -> tuple[Any, ...]:
    values = {name: getattr(row, name) for name in (*SCALAR_FIELDS, *LAYER_FIELDS)}
    values.update(skipped=bool(row.flags & FLAG_SKIPPED), scalars=decode_scalars(row.scalars))
    return tuple(_canon(values[name]) for name in _COMPARED)


def append_steps(conn: Connection, run_id: str, batch: StepBatch | StepColumns,
                 detector: DetectorConfig | None = None, *, limits: InputLimits | None = None,
                 project: str | None = None, defer_rollups: bool = False) -> BatchOutcome:
    """Store a batch's new steps and, with a detector config, judge them; raises RunNotFound, StepConflict or
    InvalidInput (then nothing is stored). With `limits`, the run's layer list with the batch's new layers is
    held to them (the batch's own counts are the caller's to check, before the transaction). With `project`, a
    run of another project is not found either. With `defer_rollups`, the rollups of steps above the run's
    rollups are left to the caller's rollup worker (rollup_worker.py), to merge after the commit; without, they
    are merged in this transaction, with any steps an earlier deferred batch left waiting."""
    run = _lock_run(conn, run_id)
    if run is None or not _in_project(conn, run, project):
        raise RunNotFound(run_id)
    layers, index_map = _layer_mapper(list(run.layer_names), batch.layers)
    if limits is not None and len(layers) > len(run.layer_names):
        limits.check_run_layers(["body", "layers"], len(layers))
    if isinstance(batch, StepColumns):
        if index_map is None and batch.is_plain_append(run.last_step):
            return _store(conn, run, batch, layers, detector, duplicates=0, late=set(),
                          defer_rollups=defer_rollups)
        batch = batch.to_batch()  # resends, repeats, out-of-order steps, another layer order: the general path
    arrays = _layer_arrays(batch, len(layers), index_map)
    last_step = run.last_step

    # In-batch repeats: identical ones collapse, different ones conflict.
    first_at: dict[int, int] = {}  # step -> its first index in the batch
    conflicts: list[int] = []
    repeats = 0
    for i, s in enumerate(batch.steps):
        seen = first_at.setdefault(s.step, i)
        if seen == i:
            continue
        if _sent_key(batch.steps[seen], arrays, seen) == _sent_key(s, arrays, i):
            repeats += 1
        else:
            conflicts.append(s.step)

    stored: dict[int, Row[Any]] = {}
    if last_step is not None and first_at and min(first_at) <= last_step:
        stored = stored_steps(conn, run.id, (t for t in first_at if t <= last_step))
        for t, row in stored.items():
            i = first_at[t]
            if _stored_key(row) != _sent_key(batch.steps[i], arrays, i):
                conflicts.append(t)
    if conflicts:
        raise StepConflict(run_id, sorted(set(conflicts)))

    new = [first_at[t] for t in sorted(first_at) if t not in stored]
    late = set() if last_step is None or not new or batch.steps[new[0]].step >= last_step else \
        {batch.steps[i].step for i in new if batch.steps[i].step < last_step}
    columns = StepColumns.from_steps([batch.steps[i] for i in new],
                                     {name: [column[i] for i in new] for name, column in arrays.items()}, layers)
    return _store(conn, run, columns, layers, detector, duplicates=len(stored) + repeats, late=late,
                  defer_rollups=defer_rollups)


def _store(conn: Connection, run: LockedRun, new: StepColumns, layers: list[str], detector: DetectorConfig | None,
           *, duplicates: int, late: set[int], defer_rollups: bool) -> BatchOutcome:
    """Insert a batch's new steps (ascending), judge them (with detection on) and move the run row on: last
    step, step count, detector state, layer names."""
    run_pk = run.id
    changes: dict[str, Any] = {"updated_at": now_utc()}
    outcome = BatchOutcome(run_pk=run_pk, accepted=len(new.steps), duplicates=duplicates, last_step=run.last_step)
    if new.steps:
        insert_rows(conn, new.rows(run_pk, storage_dialect(conn), late))
        outcome.rollups_waiting = roll_up_batch(conn, run_pk, new, len(layers), run.last_step, defer=defer_rollups)
        if outcome.rollups_waiting and not late:
            outcome.new_steps = (new.for_rollups(), len(layers))
        outcome.last_step = max(new.steps[-1], run.last_step if run.last_step is not None else -1)
        outcome.measured_values = new.measured_values()
        changes.update(last_step=outcome.last_step, n_steps=run.n_steps + len(new.steps))
        if detector is not None:
            started = time.perf_counter()
            judged = advance_detection(conn, run_pk, run.detector_state, new.detector_steps(), detector)
            outcome.detector_seconds = time.perf_counter() - started
            changes["detector_state"] = judged.state_doc
            outcome.raised_incidents, outcome.opened_incidents = judged.raised, judged.opened
    if layers != list(run.layer_names):
        changes["layer_names"] = layers
    if new.steps or "layer_names" in changes:
        conn.execute(update(runs).where(runs.c.id == run_pk).values(**changes))
    return outcome

