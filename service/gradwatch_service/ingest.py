"""Writes: create/update runs and append step batches, idempotently, in one transaction each.

Appending a batch, in the caller's write transaction:
1. lock the run row (`FOR UPDATE` on PostgreSQL; SQLite holds the database write lock already);
2. map the batch's per-layer arrays onto the run's layer order (appending new layer names);
3. compare steps that may already be stored with what is stored: identical ones are duplicates (a resend),
   different ones make the whole batch a 409 and nothing is written;
4. insert the new steps (one executemany on SQLite, one binary COPY on PostgreSQL), advance the run's
   counters, and, with detection on, its detector state and incidents (see detection.py).
The caller commits, then acknowledges: a 2xx means durable. A binary batch (columns.py) of new, ascending steps
in the run's layer order has nothing to map or compare: its rows come straight from its columns; any other
binary batch is turned into the JSON model first and takes these same steps.
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select, update

from gradwatch.detect import DetectorConfig
from gradwatch.wire import jsonable, pack_floats

from .codec import decode_scalars, encode_scalars
from .columns import StepColumns
from .db import now_utc
from .detection import advance_detection, detector_step
from .models import FLAG_LATE, FLAG_SKIPPED, projects, runs, steps
from .schemas import RunUpsert, StepBatch, StepIn

__all__ = ["RunNotFound", "StepConflict", "BatchInvalid", "BatchOutcome", "upsert_run", "append_steps"]

STEP_COLUMNS = ("run_pk", "step", "time", "loss", "grad_norm", "lr", "update_norm", "flags",
                "layer_grad_norms", "layer_weight_norms", "layer_update_norms", "scalars")
_LAYER_FIELDS = ("layer_grad_norms", "layer_weight_norms", "layer_update_norms")
_COMPARED = ("loss", "grad_norm", "lr", "update_norm", "skipped", *_LAYER_FIELDS, "scalars")


class RunNotFound(LookupError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} does not exist: create it with PUT /v1/runs/{run_id} first")
        self.run_id = run_id


class StepConflict(ValueError):
    def __init__(self, run_id: str, conflicting: Sequence[int]) -> None:
        shown = ", ".join(map(str, conflicting[:20])) + (" …" if len(conflicting) > 20 else "")
        super().__init__(
            f"{len(conflicting)} step(s) of run {run_id!r} were already stored with different values "
            f"(steps {shown}); nothing of this batch was stored"
        )
        self.steps = list(conflicting)


class BatchInvalid(ValueError):
    """A batch that is well-formed JSON of the right shape but inconsistent (e.g. array lengths)."""

    def __init__(self, loc: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = list(loc)


@dataclass
class BatchOutcome:
    run_pk: int
    accepted: int
    duplicates: int
    last_step: int | None
    raised_incidents: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- runs

def _project_id(conn: Connection, name: str) -> int:
    pid = conn.execute(select(projects.c.id).where(projects.c.name == name)).scalar()
    if pid is not None:
        return int(pid)
    dialect = conn.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        conn.execute(pg_insert(projects).values(name=name).on_conflict_do_nothing(index_elements=["name"]))
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        conn.execute(sqlite_insert(projects).values(name=name).on_conflict_do_nothing(index_elements=["name"]))
    return int(conn.execute(select(projects.c.id).where(projects.c.name == name)).scalar_one())


def _merge_layers(current: list[str], incoming: Sequence[str]) -> list[str]:
    known = set(current)
    return current + [name for name in incoming if name not in known]


def upsert_run(conn: Connection, run_id: str, body: RunUpsert) -> bool:
    """Create the run or update the fields the body carries. Returns True when it was created."""
    if body.layers is not None and len(set(body.layers)) != len(body.layers):
        raise BatchInvalid(["body", "layers"], "layer names must be unique")
    now = now_utc()
    row = _lock_run(conn, run_id)
    if row is None:
        values: dict[str, Any] = {
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
        }
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            inserted = conn.execute(
                pg_insert(runs).values(**values).on_conflict_do_nothing(index_elements=["run_id"]).returning(runs.c.id)
            ).first()
            if inserted is not None:
                return True
            row = _lock_run(conn, run_id)  # a concurrent PUT created it first: update it instead
            assert row is not None
        else:
            conn.execute(runs.insert().values(**values))
            return True
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
            raise BatchInvalid(["body", "layers"], "layers may only be appended to: the run already has "
                                                   f"{len(current)} layers starting {current[:3]}")
        changes["layer_names"] = _merge_layers(current, body.layers)
    if changes:
        changes["updated_at"] = now
        conn.execute(update(runs).where(runs.c.id == row.id).values(**changes))
    return False


def _lock_run(conn: Connection, run_id: str) -> Any:
    q = select(runs.c.id, runs.c.layer_names, runs.c.last_step, runs.c.n_steps, runs.c.detector_state) \
        .where(runs.c.run_id == run_id)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    return conn.execute(q).first()


# --------------------------------------------------------------------------------------------------- steps

def _layer_mapper(run_layers: list[str], batch_layers: list[str] | None) -> tuple[list[str], list[int] | None]:
    """The run's (possibly extended) layer list and, where the batch's order differs, the index map."""
    if batch_layers is None:
        return run_layers, None
    if len(set(batch_layers)) != len(batch_layers):
        raise BatchInvalid(["body", "layers"], "layer names must be unique")
    if run_layers[: len(batch_layers)] == batch_layers:
        return run_layers, None
    if batch_layers[: len(run_layers)] == run_layers:
        return list(batch_layers), None
    merged = _merge_layers(run_layers, batch_layers)
    position = {name: i for i, name in enumerate(merged)}
    return merged, [position[name] for name in batch_layers]


def _rows_for(new_steps: Sequence[StepIn], run_pk: int, n_layers_batch: int | None, n_layers_run: int,
              index_map: list[int] | None, sqlite: bool, late: set[int]) -> list[tuple[Any, ...]]:
    """Database rows for the new steps; this loop is the hot path of ingest, so it stays flat."""
    now = _time.time()
    pack = pack_floats if sqlite else None
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    for s in new_steps:
        arrays: list[Any] = [s.layer_grad_norms, s.layer_weight_norms, s.layer_update_norms]
        for k in range(3):
            values = arrays[k]
            if values is None:
                continue
            if n_layers_batch is not None:
                if len(values) != n_layers_batch:
                    raise BatchInvalid(["body", "steps", f"step {s.step}", _LAYER_FIELDS[k]],
                                       f"has {len(values)} values but there are {n_layers_batch} layers")
            elif len(values) > n_layers_run:
                raise BatchInvalid(["body", "steps", f"step {s.step}", _LAYER_FIELDS[k]],
                                   f"has {len(values)} values but the run has {n_layers_run} layers: "
                                   "send `layers` with the batch or the run")
            if index_map is not None:
                values = _in_run_order(values, index_map, n_layers_run)
            arrays[k] = pack(values) if pack is not None else values
        scalars = s.scalars
        flags = (FLAG_SKIPPED if s.skipped else 0) | (FLAG_LATE if late and s.step in late else 0)
        loss: float | str | None = s.loss
        grad_norm: float | str | None = s.grad_norm
        lr: float | str | None = s.lr
        update_norm: float | str | None = s.update_norm
        if sqlite:  # SQLite would store a NaN parameter as NULL; see codec
            loss = loss if loss == loss else "NaN"
            grad_norm = grad_norm if grad_norm == grad_norm else "NaN"
            lr = lr if lr == lr else "NaN"
            update_norm = update_norm if update_norm == update_norm else "NaN"
        append((run_pk, s.step, now if s.time is None else s.time, loss, grad_norm, lr, update_norm, flags,
                arrays[0], arrays[1], arrays[2],
                None if scalars is None else encode_scalars(scalars, sqlite)))
    return rows


def _in_run_order(values: Sequence[float | None], index_map: list[int], n_layers: int) -> list[float | None]:
    """Per-layer values sent in the batch's layer order, placed in the run's (None where the batch has none)."""
    placed: list[float | None] = [None] * n_layers
    for i, v in zip(index_map, values, strict=True):
        placed[i] = v
    return placed


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


def _sent_key(step: StepIn, index_map: list[int] | None, n_layers: int) -> tuple[Any, ...]:
    out: list[Any] = []
    for name in _COMPARED:
        v = getattr(step, name)
        if name in _LAYER_FIELDS and v is not None and index_map is not None:
            v = _in_run_order(v, index_map, n_layers)
        out.append(_canon(v))
    return tuple(out)


def _stored_key(row: Any) -> tuple[Any, ...]:
    scalars = decode_scalars(row.scalars)
    return tuple(_canon(v) for v in (row.loss, row.grad_norm, row.lr, row.update_norm,
                                     bool(row.flags & FLAG_SKIPPED), row.layer_grad_norms,
                                     row.layer_weight_norms, row.layer_update_norms, scalars))


def _stored_rows(conn: Connection, run_pk: int, wanted: Iterable[int]) -> dict[int, Any]:
    wanted = sorted(wanted)
    found: dict[int, Any] = {}
    for i in range(0, len(wanted), 500):
        chunk = wanted[i: i + 500]
        q = select(steps).where(steps.c.run_pk == run_pk, steps.c.step.in_(chunk))
        for row in conn.execute(q):
            found[row.step] = row
    return found


def _insert_sql(dialect: str) -> str:
    cols = ", ".join(STEP_COLUMNS)
    if dialect == "sqlite":
        return f"INSERT INTO steps ({cols}) VALUES ({', '.join('?' * len(STEP_COLUMNS))})"
    marks = ["%s"] * len(STEP_COLUMNS)
    for i, c in enumerate(STEP_COLUMNS):
        if c.startswith("layer_"):
            marks[i] = "%s::float8[]"
        elif c == "scalars":
            marks[i] = "%s::jsonb"
    return f"INSERT INTO steps ({cols}) VALUES ({', '.join(marks)})"


_COPY_TYPES = ["int8", "int8", "float8", "float8", "float8", "float8", "float8", "int2",
               "float8[]", "float8[]", "float8[]", "jsonb"]


def insert_rows(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert step rows: executemany on SQLite, binary COPY on PostgreSQL (five times executemany's rate).

    COPY cannot skip conflicting rows, which is fine: the caller has already removed stored steps under the run's
    row lock, so no other transaction can insert these steps meanwhile.
    """
    if conn.dialect.name != "postgresql":
        conn.exec_driver_sql(_insert_sql(conn.dialect.name), rows)
        return
    from psycopg.types.json import Jsonb

    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(f"COPY steps ({', '.join(STEP_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_COPY_TYPES)
        for row in rows:
            if row[11] is not None:
                row = (*row[:11], Jsonb(row[11]))
            copy.write_row(row)


def append_steps(conn: Connection, run_id: str, batch: StepBatch | StepColumns,
                 detector: DetectorConfig | None = None) -> BatchOutcome:
    """Store a batch's new steps and, with a detector config, judge them; raises RunNotFound, StepConflict or
    BatchInvalid (then nothing is stored)."""
    run = _lock_run(conn, run_id)
    if run is None:
        raise RunNotFound(run_id)
    run_pk = int(run.id)
    layers, index_map = _layer_mapper(list(run.layer_names), batch.layers)
    if isinstance(batch, StepColumns):
        if index_map is None and batch.is_plain_append(run.last_step):
            return _append_columns(conn, run, batch, layers, detector)
        batch = batch.to_batch()  # resends, repeats, out-of-order steps, another layer order: the general path
    n_batch_layers = len(batch.layers) if batch.layers is not None else None
    last_step = run.last_step

    # In-batch repeats: identical ones collapse, different ones conflict.
    unique: dict[int, StepIn] = {}
    conflicts: list[int] = []
    repeats = 0
    for s in batch.steps:
        seen = unique.get(s.step)
        if seen is None:
            unique[s.step] = s
        elif _sent_key(seen, index_map, len(layers)) == _sent_key(s, index_map, len(layers)):
            repeats += 1
        else:
            conflicts.append(s.step)

    stored: dict[int, Any] = {}
    if last_step is not None and unique and min(unique) <= last_step:
        stored = _stored_rows(conn, run_pk, (k for k in unique if k <= last_step))
        for k, row in stored.items():
            if _stored_key(row) != _sent_key(unique[k], index_map, len(layers)):
                conflicts.append(k)
    if conflicts:
        raise StepConflict(run_id, sorted(set(conflicts)))

    new_steps = [unique[k] for k in sorted(unique) if k not in stored]
    late = set() if last_step is None or not new_steps or new_steps[0].step >= last_step else \
        {s.step for s in new_steps if s.step < last_step}
    rows = _rows_for(new_steps, run_pk, n_batch_layers, len(layers), index_map, conn.dialect.name == "sqlite", late)
    new_last = max(new_steps[-1].step, last_step if last_step is not None else -1) if rows else last_step
    names = list(batch.layers if batch.layers is not None else layers)
    raised = _record(conn, run, rows, new_last, lambda: [detector_step(s, names) for s in new_steps], layers,
                     detector)
    return BatchOutcome(run_pk=run_pk, accepted=len(rows), duplicates=len(stored) + repeats, last_step=new_last,
                        raised_incidents=raised)


def _append_columns(conn: Connection, run: Any, batch: StepColumns, layers: list[str],
                    detector: DetectorConfig | None) -> BatchOutcome:
    """A binary batch of new, ascending steps in the run's layer order: rows straight from the columns."""
    rows = batch.rows(int(run.id), conn.dialect.name == "sqlite")
    new_last = batch.steps[-1] if rows else run.last_step
    names = list(batch.layers if batch.layers is not None else layers)
    raised = _record(conn, run, rows, new_last, lambda: batch.detector_steps(names), layers, detector)
    return BatchOutcome(run_pk=int(run.id), accepted=len(rows), duplicates=0, last_step=new_last,
                        raised_incidents=raised)


def _record(conn: Connection, run: Any, rows: list[tuple[Any, ...]], new_last: int | None,
            judged_steps: Callable[[], list[dict[str, Any]]], layers: list[str],
            detector: DetectorConfig | None) -> list[int]:
    """Insert a batch's new rows, judge its new steps (with detection on) and move the run row on: last step,
    step count, detector state, layer names. Returns the seq of every incident the batch raised.
    `judged_steps` (the new steps as the detector reads them) is only called with detection on."""
    run_pk = int(run.id)
    changes: dict[str, Any] = {"updated_at": now_utc()}
    raised: list[int] = []
    if rows:
        insert_rows(conn, rows)
        changes.update(last_step=new_last, n_steps=int(run.n_steps) + len(rows))
        if detector is not None:
            judged = advance_detection(conn, run_pk, run.detector_state, judged_steps(), detector)
            changes["detector_state"] = judged.state_doc
            raised = judged.raised
    if layers != list(run.layer_names):
        changes["layer_names"] = layers
    if rows or "layer_names" in changes:
        conn.execute(update(runs).where(runs.c.id == run_pk).values(**changes))
    return raised
