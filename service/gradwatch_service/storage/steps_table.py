"""The steps table: its columns, how a batch's new steps become its rows, and how those rows get in.

Both wires end in one form, `StepColumns`: a binary batch is parsed into it (binary_batch.py), and ingest turns
a JSON batch's new steps into it once they are checked and in the run's layer order. `StepColumns.rows` is the
one row builder and `StepColumns.detector_steps` the one source of the steps the detectors read. What differs
per database (how values are bound, how rows get in) is the storage dialect's (dialect.py).
"""

from __future__ import annotations

import time as _time
from collections.abc import Collection, Iterable, Sequence
from itertools import repeat
from typing import Any

from sqlalchemy import Connection, Row, select

from gradwatch.detect import StepInput
from gradwatch.wire import LAYER_FIELDS, MISSING_BYTES, SCALAR_FIELDS, STEP_COLUMN_FIELDS, pack_floats, unpack_floats

from ..schemas import StepBatch, StepIn
from .dialect import COPY_TYPES, STEP_COLUMNS, StorageDialect, encode_scalars, storage_dialect
from .models import FLAG_LATE, FLAG_SKIPPED, steps

__all__ = ["COPY_TYPES", "STEP_COLUMNS", "LayerColumn", "StepColumns", "insert_rows", "stored_steps"]

LayerRow = list[float | None]


class LayerColumn:
    """One per-layer field of a batch's steps, kept in the form it arrived in: the binary wire's step-major
    float64 section (SQLite's blobs are slices of it) or one list per step (JSON)."""

    def __init__(self, n_steps: int, n_layers: int, section: bytes | None = None,
                 lists: list[LayerRow | None] | None = None) -> None:
        self.n_steps = n_steps
        self.n_layers = n_layers
        self.section = section
        self._lists = lists
        self._missing: int | None = None

    def missing_in_section(self) -> int:
        """How many values of the section are the not-measured sentinel: one scan, shared by every reader (most
        sections have none, and then nothing needs to look value by value)."""
        if self._missing is None:
            self._missing = self.section.count(MISSING_BYTES) if self.section is not None else 0
        return self._missing

    def lists(self) -> list[LayerRow | None]:
        """One list per step; None for a step without the field (in a section: a row of sentinels only)."""
        if self._lists is None:
            assert self.section is not None
            width = self.n_layers
            if width == 0:
                self._lists = [None] * self.n_steps
            else:
                flat = unpack_floats(self.section)
                rows = [flat[i: i + width] for i in range(0, len(flat), width)]
                self._lists = [None if row.count(None) == width else row for row in rows] \
                    if self.missing_in_section() else list(rows)
        return self._lists

    def blobs(self) -> Sequence[bytes | None]:
        """One little-endian float64 blob per step, as SQLite stores it."""
        if self.section is None:
            return [None if row is None else pack_floats(row) for row in self.lists()]
        if self.n_layers == 0:
            return [None] * self.n_steps
        width = 8 * self.n_layers
        section = self.section
        blobs: list[bytes | None] = [section[i: i + width] for i in range(0, len(section), width)]
        if self.missing_in_section():
            empty = MISSING_BYTES * self.n_layers
            blobs = [None if b == empty else b for b in blobs]
        return blobs


class StepColumns:
    """A batch's steps as columns, the form both wires hand to storage and detection.

    `values` holds the STEP_COLUMN_FIELDS (time and the measured scalars) the batch carries, `layer_columns` its
    per-layer fields, aligned with `layers` (the layer names); a field that is absent is absent for every step.
    """

    def __init__(self, *, batch_id: str | None, layers: list[str] | None, steps: list[int],
                 values: dict[str, list[float | None]], layer_columns: dict[str, LayerColumn],
                 skipped: Sequence[int] | None, scalars: Sequence[dict[str, float | None] | None] | None) -> None:
        self.batch_id = batch_id
        self.layers = layers
        self.steps = steps
        self.values = values
        self.layer_columns = layer_columns
        self.skipped = skipped
        self.scalars = scalars
        self._times: Sequence[float] | None = None

    @classmethod
    def from_steps(cls, new_steps: Sequence[StepIn], layer_arrays: dict[str, list[LayerRow | None]],
                   layer_names: list[str]) -> StepColumns:
        """JSON steps whose per-layer arrays the caller checked and put in the run's order (`layer_arrays`, one
        entry per step, aligned with `layer_names`)."""
        n = len(new_steps)
        values = {name: [getattr(s, name) for s in new_steps] for name in STEP_COLUMN_FIELDS}
        layer_columns = {name: LayerColumn(n, len(layer_names), lists=arrays) for name, arrays in layer_arrays.items()
                         if any(a is not None for a in arrays)}
        skipped = [int(s.skipped) for s in new_steps]
        scalars = [s.scalars for s in new_steps]
        return cls(batch_id=None, layers=layer_names, steps=[s.step for s in new_steps], values=values,
                   layer_columns=layer_columns, skipped=skipped if any(skipped) else None,
                   scalars=scalars if any(s is not None for s in scalars) else None)

    def measured_values(self) -> int:
        """How many measured values the batch carries (scalars and per-layer norms; time and "not measured" are
        not counted): what `gradwatch_ingested_values_total` adds up. Whole columns at a time."""
        total = sum(len(col) - col.count(None) for name in SCALAR_FIELDS if (col := self.values.get(name)))
        for column in self.layer_columns.values():
            if column.section is not None:
                total += len(column.section) // 8 - column.missing_in_section()
            else:
                total += sum(len(row) - row.count(None) for row in column.lists() if row is not None)
        return total

    def for_rollups(self) -> StepColumns:
        """The same steps with only what the rollups read (rollups.batch_steps), for the rollup worker to hold
        until it merges them: a per-layer field that came as a binary section is kept as that alone (8 bytes a
        value), without the lists built from it for storage or detection (about 32)."""
        columns = {name: LayerColumn(c.n_steps, c.n_layers, section=c.section) if c.section is not None else c
                   for name, c in self.layer_columns.items()}
        out = StepColumns(batch_id=None, layers=self.layers, steps=self.steps, values=self.values,
                          layer_columns=columns, skipped=None, scalars=None)
        out._times = self.stored_times()
        return out

    def is_plain_append(self, last_step: int | None) -> bool:
        """Unique, ascending steps, all after the run's last one: nothing to compare, nothing late."""
        steps = self.steps
        if not steps or (last_step is not None and steps[0] <= last_step):
            return False
        return all(a < b for a, b in zip(steps, steps[1:], strict=False))

    def stored_times(self) -> Sequence[float]:
        """Each step's time as stored: the service stamps the steps the client sent no time for (once, so the
        rows and the rollups agree)."""
        if self._times is None:
            n = len(self.steps)
            times = self.values.get("time")
            if times is None:
                self._times = [_time.time()] * n
            elif None in times:
                now = _time.time()
                self._times = [now if t is None else t for t in times]
            else:
                self._times = times  # type: ignore[assignment]
        assert self._times is not None
        return self._times

    def rows(self, run_pk: int, dialect: StorageDialect, late: Collection[int] = ()) -> list[tuple[Any, ...]]:
        """The steps as rows of STEP_COLUMNS; `late` steps are flagged. The hot path of ingest: whole columns at
        a time, no per-step Python beyond the final zip."""
        n = len(self.steps)
        time_col = self.stored_times()
        measured: list[Iterable[Any]] = []
        for name in SCALAR_FIELDS:
            col = self.values.get(name)
            measured.append(repeat(None, n) if col is None else dialect.real_params(col))
        flags: Iterable[int] = repeat(0, n)
        if self.skipped is not None or late:
            skipped = self.skipped if self.skipped is not None else repeat(0, n)
            flags = [(FLAG_SKIPPED if sk else 0) | (FLAG_LATE if t in late else 0)
                     for t, sk in zip(self.steps, skipped, strict=False)]
        arrays: list[Iterable[Any]] = []
        for name in LAYER_FIELDS:
            column = self.layer_columns.get(name)
            arrays.append(repeat(None, n) if column is None else dialect.array_params(column))
        scalars: Iterable[Any] = repeat(None, n)
        if self.scalars is not None:
            scalars = [None if s is None else encode_scalars(s, dialect) for s in self.scalars]
        return list(zip(repeat(run_pk, n), self.steps, time_col, *measured, flags, *arrays, scalars, strict=False))

    def detector_steps(self) -> list[StepInput]:
        """The steps as `gradwatch.detect.advance` reads them (`StepInput`, one per step, built column-wise):
        the per-layer lists go in as they are, with one `layer_names` list for the whole batch (which makes the
        detector's names check a pointer comparison). With no layer names every per-layer list is empty: the
        detectors get none (nothing to judge)."""
        n = len(self.steps)
        measured = [self.values.get(name) or repeat(None, n) for name in SCALAR_FIELDS]
        layer_lists = [column.lists() if (column := self.layer_columns.get(name)) is not None and self.layers
                       else repeat(None, n) for name in LAYER_FIELDS]
        skipped: Iterable[bool] = repeat(False, n) if self.skipped is None else map(bool, self.skipped)
        # StepInput's fields in order: step, the SCALAR_FIELDS, skipped, layer_names, the LAYER_FIELDS
        return list(map(StepInput, self.steps, *measured, skipped, repeat(self.layers, n), *layer_lists))

    def to_batch(self) -> StepBatch:
        """The same batch as JSON would have carried it, for ingest's general path (resends, repeats,
        out-of-order steps, another layer order)."""
        steps: list[dict[str, Any]] = [{"step": s} for s in self.steps]
        for name, col in self.values.items():
            for d, v in zip(steps, col, strict=True):
                if v is not None:
                    d[name] = v
        for name, column in self.layer_columns.items():
            for d, row in zip(steps, column.lists(), strict=True):
                if row is not None:
                    d[name] = row
        if self.skipped is not None:
            for d, b in zip(steps, self.skipped, strict=True):
                d["skipped"] = bool(b)
        if self.scalars is not None:
            for d, scalars in zip(steps, self.scalars, strict=True):
                if scalars is not None:
                    d["scalars"] = scalars
        return StepBatch.model_validate({"batch_id": self.batch_id, "layers": self.layers, "steps": steps})


def stored_steps(conn: Connection, run_pk: int, wanted: Iterable[int]) -> dict[int, Row[Any]]:
    """The stored rows of the wanted steps that exist, by step (decoded by the table's column types)."""
    ordered = sorted(wanted)
    found: dict[int, Row[Any]] = {}
    for i in range(0, len(ordered), 500):
        q = select(steps).where(steps.c.run_pk == run_pk, steps.c.step.in_(ordered[i: i + 500]))
        for row in conn.execute(q):
            found[row.step] = row
    return found


def insert_rows(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert step rows (`StepColumns.rows`): executemany on SQLite, binary COPY on PostgreSQL (dialect.py)."""
    storage_dialect(conn).insert_steps(conn, rows)
