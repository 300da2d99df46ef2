"""Step rollups: the step_rollups table's maintenance (inside the ingest transaction) and its reads.

A level of width w keeps one row per bucket of w steps (bucket = step // w) with, per scalar field and per layer
of each per-layer field, the statistics a spike-keeping downsample needs (queries.py): the finite minimum and
maximum with their steps, the first NaN, +Infinity and -Infinity with their steps, the non-finite count and the
last measured value with its step. Every statistic merges exactly (min of mins, first of firsts, the last of
the highest step), so a batch's buckets are built from its steps and merged with the stored rows, and each
coarser level is built from the finer one (each width is a multiple of the one before).

In memory, k units (steps, buckets or groups of buckets) are `Units`: each statistic one (k, C) numpy matrix
whose C columns are every field's values side by side (`Layout`: a scalar field one column, a per-layer field
one per layer), so a level costs a few dozen whole-matrix operations whatever the fields. "None" is a sentinel
there: +Inf for a missing minimum, -Inf for a missing maximum, NONE_STEP for a missing step, -1 for a missing
last step. In the table it is NULL (a NULL element of a PostgreSQL array, the not-measured sentinel in a SQLite
blob); a per-layer field with nothing measured in a bucket is a NULL array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection

from gradwatch.wire import LAYER_FIELDS, SCALAR_FIELDS

from .dialect import StorageDialect, float_rows, float_section, storage_dialect
from .models import ROLLUP_SCALAR_STATS, ROLLUP_WIDTHS
from .steps_table import StepColumns

__all__ = ["NONE_STEP", "STATS", "Layout", "FieldStats", "Units", "Steps", "batch_steps", "bucket_units",
           "concat_steps", "update_rollups", "roll_up_batch", "merge_waiting", "raw_steps", "read_units", "raw_units",
           "reduce_units", "concat_units", "take_units", "layout_of", "rolled_up_through", "catch_up_rollups",
           "lagging_runs"]

F8 = npt.NDArray[np.float64]
I8 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]
Layout = dict[str, tuple[int, int]]
"""field → its columns (start, stop) in the statistics' matrices."""

NONE_STEP = np.iinfo(np.int64).max
STATS = ROLLUP_SCALAR_STATS
_KEY = ("run_pk", "width", "bucket")
_BASE = ("n", "first_step", "last_step", "time_min", "time_max")


def layout_of(fields: Mapping[str, int]) -> Layout:
    """Columns for fields of the given widths, side by side in the mapping's order."""
    out, at = {}, 0
    for name, width in fields.items():
        out[name] = (at, at + width)
        at += width
    return out


def _all_fields(n_layers: int) -> dict[str, int]:
    return {**dict.fromkeys(SCALAR_FIELDS, 1), **dict.fromkeys(LAYER_FIELDS, n_layers)}


@dataclass
class FieldStats:
    """The statistics of k units over C columns."""

    min: F8
    max: F8
    min_step: I8
    max_step: I8
    last: F8
    last_step: I8
    nonfinite: I8
    nan_step: I8
    posinf_step: I8
    neginf_step: I8

    @classmethod
    def of_values(cls, step_list: I8, values: F8, missing: Mask | None) -> FieldStats:
        """Each step its own unit: `values` (k, C), `missing` marks the values not measured."""
        s = np.broadcast_to(step_list[:, None], values.shape)
        finite = np.isfinite(values)
        nonfinite = ~finite if missing is None else ~finite & ~missing
        at_finite = np.where(finite, s, NONE_STEP)
        return cls(min=np.where(finite, values, np.inf), max=np.where(finite, values, -np.inf),
                   min_step=at_finite, max_step=at_finite, last=values,
                   last_step=np.broadcast_to(s, values.shape) if missing is None else np.where(missing, -1, s),
                   nonfinite=nonfinite.astype(np.int64),
                   nan_step=np.where(np.isnan(values) & nonfinite, s, NONE_STEP),
                   posinf_step=np.where(values == np.inf, s, NONE_STEP),
                   neginf_step=np.where(values == -np.inf, s, NONE_STEP))

    @classmethod
    def empty(cls, k: int, n_cols: int) -> FieldStats:
        """k units in which nothing was measured."""
        shape = (k, n_cols)
        none = np.full(shape, NONE_STEP, dtype=np.int64)
        return cls(min=np.full(shape, np.inf), max=np.full(shape, -np.inf), min_step=none, max_step=none,
                   last=np.full(shape, np.nan), last_step=np.full(shape, -1, dtype=np.int64),
                   nonfinite=np.zeros(shape, dtype=np.int64), nan_step=none, posinf_step=none, neginf_step=none)

    def map(self, fn: Any) -> FieldStats:
        return FieldStats(**{name: fn(getattr(self, name)) for name in STATS})


@dataclass
class Units:
    """k units in ascending step order: their keys, counts, step and time ranges, and statistics."""

    key: I8
    n: I8
    first_step: I8
    last_step: I8
    time_min: F8
    time_max: F8
    stats: FieldStats
    layout: Layout

    def __len__(self) -> int:
        return len(self.key)


def step_units(step_list: Sequence[int] | I8, times: Sequence[float] | F8, values: F8, missing: Mask | None,
               layout: Layout) -> Units:
    """Each step its own unit."""
    s = np.asarray(step_list, dtype=np.int64)
    t = np.asarray(times, dtype=np.float64)
    return Units(key=s, n=np.ones(len(s), dtype=np.int64), first_step=s, last_step=s, time_min=t, time_max=t,
                 stats=FieldStats.of_values(s, values, missing), layout=layout)


def reduce_units(units: Units, key: I8) -> Units:
    """Merge the units that share a key (`key` non-decreasing, one per unit) into one unit per key."""
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    lengths = np.diff(np.append(starts, len(key)))
    st = units.stats

    def lowest_where(mask: Mask, step_list: I8) -> I8:
        return np.minimum.reduceat(np.where(mask, step_list, NONE_STEP), starts, axis=0)

    vmin = np.minimum.reduceat(st.min, starts, axis=0)
    vmax = np.maximum.reduceat(st.max, starts, axis=0)
    last_step = np.maximum.reduceat(st.last_step, starts, axis=0)
    rows = np.broadcast_to(np.arange(len(key))[:, None], st.last.shape)
    at = np.maximum.reduceat(np.where(st.last_step == np.repeat(last_step, lengths, axis=0), rows, 0), starts, axis=0)
    stats = FieldStats(min=vmin, max=vmax,
                       min_step=lowest_where(st.min == np.repeat(vmin, lengths, axis=0), st.min_step),
                       max_step=lowest_where(st.max == np.repeat(vmax, lengths, axis=0), st.max_step),
                       last=np.take_along_axis(st.last, at, axis=0), last_step=last_step,
                       nonfinite=np.add.reduceat(st.nonfinite, starts, axis=0),
                       nan_step=np.minimum.reduceat(st.nan_step, starts, axis=0),
                       posinf_step=np.minimum.reduceat(st.posinf_step, starts, axis=0),
                       neginf_step=np.minimum.reduceat(st.neginf_step, starts, axis=0))
    return Units(key=key[starts], n=np.add.reduceat(units.n, starts),
                 first_step=np.minimum.reduceat(units.first_step, starts),
                 last_step=np.maximum.reduceat(units.last_step, starts),
                 time_min=np.minimum.reduceat(units.time_min, starts),
                 time_max=np.maximum.reduceat(units.time_max, starts), stats=stats, layout=units.layout)


def relayout(units: Units, layout: Layout) -> Units:
    """The same units in another layout (fields the units lack are unmeasured, narrower fields are widened)."""
    if units.layout == layout:
        return units
    n_cols = max((b for _, b in layout.values()), default=0)
    st = FieldStats.empty(len(units), n_cols)
    out = {name: np.array(getattr(st, name)) for name in STATS}
    for name, (a, b) in layout.items():
        if name in units.layout:
            c, d = units.layout[name]
            width = min(b - a, d - c)
            for stat in STATS:
                out[stat][:, a: a + width] = getattr(units.stats, stat)[:, c: c + width]
    return Units(key=units.key, n=units.n, first_step=units.first_step, last_step=units.last_step,
                 time_min=units.time_min, time_max=units.time_max, stats=FieldStats(**out), layout=layout)


def concat_units(parts: Sequence[Units], layout: Layout) -> Units:
    """Units of several sources as one, in one layout."""
    parts = [relayout(p, layout) for p in parts]
    stats = FieldStats(**{s: np.concatenate([getattr(p.stats, s) for p in parts]) for s in STATS})
    return Units(key=np.concatenate([p.key for p in parts]), n=np.concatenate([p.n for p in parts]),
                 first_step=np.concatenate([p.first_step for p in parts]),
                 last_step=np.concatenate([p.last_step for p in parts]),
                 time_min=np.concatenate([p.time_min for p in parts]),
                 time_max=np.concatenate([p.time_max for p in parts]), stats=stats, layout=layout)


def take_units(units: Units, rows: npt.NDArray[np.intp]) -> Units:
    return Units(key=units.key[rows], n=units.n[rows], first_step=units.first_step[rows],
                 last_step=units.last_step[rows], time_min=units.time_min[rows], time_max=units.time_max[rows],
                 stats=units.stats.map(lambda a: a[rows]), layout=units.layout)


@dataclass
class Steps:
    """k steps (ascending, unique) with their fields' values side by side (`layout`) and the not-measured mask
    (None: all measured), before any statistic is taken: what the finest level's buckets are built from."""

    step: I8
    time: F8
    values: F8
    missing: Mask | None
    layout: Layout

    def __len__(self) -> int:
        return len(self.step)

    def take(self, rows: npt.NDArray[np.intp]) -> Steps:
        return Steps(step=self.step[rows], time=self.time[rows], values=self.values[rows],
                     missing=None if self.missing is None else self.missing[rows], layout=self.layout)

    def units(self) -> Units:
        """Each step its own unit."""
        return step_units(self.step, self.time, self.values, self.missing, self.layout)


def concat_steps(parts: Sequence[Steps]) -> Steps:
    """Steps of several batches (ascending one after the other) as one, in a layout that holds each field at the
    widest it comes in (narrower ones padded with unmeasured values)."""
    if len(parts) == 1:
        return parts[0]
    widths: dict[str, int] = {}
    for part in parts:
        for name, (a, b) in part.layout.items():
            widths[name] = max(widths.get(name, 0), b - a)
    layout = layout_of({name: widths[name] for name in (*SCALAR_FIELDS, *LAYER_FIELDS) if name in widths})
    n_cols = max((b for _, b in layout.values()), default=0)
    if all(p.layout == layout for p in parts):
        values = np.concatenate([p.values for p in parts])
        masks = [p.missing if p.missing is not None else np.zeros(p.values.shape, dtype=bool) for p in parts]
        missing = None if all(p.missing is None for p in parts) else np.concatenate(masks)
    else:
        k = sum(len(p) for p in parts)
        values, missing = np.full((k, n_cols), np.nan), np.ones((k, n_cols), dtype=bool)
        at = 0
        for p in parts:
            for name, (a, b) in p.layout.items():
                c = layout[name][0]
                values[at: at + len(p), c: c + b - a] = p.values[:, a:b]
                missing[at: at + len(p), c: c + b - a] = False if p.missing is None else p.missing[:, a:b]
            at += len(p)
    return Steps(step=np.concatenate([p.step for p in parts]), time=np.concatenate([p.time for p in parts]),
                 values=values, missing=missing, layout=layout)


def bucket_units(steps: Steps, width: int) -> Units:
    """The steps' buckets of `width` as units. When every value is measured and finite (a healthy batch: the
    usual case), straight from the values: the minimum and maximum and their first steps, the last row, and
    nothing non-finite (a fifth of the passes over the values that `reduce_units` of one unit a step takes);
    otherwise that way."""
    key = steps.step // width
    v = steps.values
    if steps.missing is not None or not np.isfinite(v).all():
        return reduce_units(steps.units(), key)
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    ends = np.append(starts[1:], len(key)) - 1
    lengths = ends - starts + 1
    at = steps.step[:, None]
    vmin = np.minimum.reduceat(v, starts, axis=0)
    vmax = np.maximum.reduceat(v, starts, axis=0)
    min_step = np.minimum.reduceat(np.where(v == np.repeat(vmin, lengths, axis=0), at, NONE_STEP), starts, axis=0)
    max_step = np.minimum.reduceat(np.where(v == np.repeat(vmax, lengths, axis=0), at, NONE_STEP), starts, axis=0)
    shape = vmin.shape
    stats = FieldStats(min=vmin, max=vmax, min_step=min_step, max_step=max_step, last=v[ends],
                       last_step=np.repeat(steps.step[ends][:, None], shape[1], axis=1),
                       nonfinite=np.zeros(shape, dtype=np.int64), nan_step=np.full(shape, NONE_STEP),
                       posinf_step=np.full(shape, NONE_STEP), neginf_step=np.full(shape, NONE_STEP))
    return Units(key=key[starts], n=lengths.astype(np.int64), first_step=steps.step[starts],
                 last_step=steps.step[ends], time_min=np.minimum.reduceat(steps.time, starts),
                 time_max=np.maximum.reduceat(steps.time, starts), stats=stats, layout=steps.layout)


# ----------------------------------------------------------------------------------- values into numpy

def _scalar_column(column: Sequence[Any]) -> tuple[F8, Mask | None]:
    """A scalar column (None = not measured) as floats and the not-measured mask (None when all are measured)."""
    values = np.array(column, dtype=np.float64)  # None becomes NaN; the mask tells them apart
    return values, (np.array([v is None for v in column], dtype=bool) if None in column else None)


def _matrix(k: int, layout: Layout, columns: Mapping[str, tuple[F8, Mask | None]]) -> tuple[F8, Mask | None]:
    """Fields' values side by side in the layout, and one not-measured mask."""
    n_cols = max((b for _, b in layout.values()), default=0)
    values = np.empty((k, n_cols))
    missing = None
    for name, (a, b) in layout.items():
        v, m = columns[name]
        values[:, a:b] = v.reshape(k, b - a)
        if m is not None:
            if missing is None:
                missing = np.zeros((k, n_cols), dtype=bool)
            missing[:, a:b] = m.reshape(k, b - a)
    return values, missing


def batch_steps(new: StepColumns, n_layers: int) -> Steps:
    """A batch's new steps (ascending) with the fields it carries: whole columns at a time, a binary batch's
    per-layer sections read in place."""
    columns: dict[str, tuple[F8, Mask | None]] = {}
    widths: dict[str, int] = {}
    for name in SCALAR_FIELDS:
        if (column := new.values.get(name)) is not None:
            columns[name], widths[name] = _scalar_column(column), 1
    for name in LAYER_FIELDS:
        layer_column = new.layer_columns.get(name)
        if layer_column is None or n_layers == 0:
            continue
        if layer_column.section is not None and layer_column.n_layers == n_layers:
            columns[name] = float_section(layer_column.section, n_layers)
        else:
            columns[name] = float_section(float_rows(layer_column.lists(), n_layers), n_layers)
        widths[name] = n_layers
    layout = layout_of(widths)
    values, missing = _matrix(len(new.steps), layout, columns)
    return Steps(step=np.asarray(new.steps, dtype=np.int64), time=np.asarray(new.stored_times(), dtype=np.float64),
                 values=values, missing=missing, layout=layout)


# ----------------------------------------------------------------------------------------- maintenance

def update_rollups(conn: Connection, run_pk: int, new: Steps, n_layers: int) -> None:
    """Merge new steps (ascending, none of them stored before) into every level's buckets, in the caller's
    transaction: the batch's buckets are built level by level from the finer one, the stored rows of those
    buckets read, and all levels merged and written back (upsert) at once, keyed by (level, bucket)."""
    if len(new) == 0:
        return
    layout = layout_of(_all_fields(n_layers))
    finer, finer_width = relayout(bucket_units(new, ROLLUP_WIDTHS[0]), layout), ROLLUP_WIDTHS[0]
    levels: list[Units] = [finer]
    for width in ROLLUP_WIDTHS[1:]:
        finer = reduce_units(finer, finer.key // (width // finer_width))
        finer_width = width
        levels.append(finer)
    batch = concat_units(levels, layout)
    level_of = np.repeat(np.arange(len(levels), dtype=np.int64), [len(u) for u in levels])
    batch_key = _level_key(level_of, batch.key)
    stored, stored_width = _read_stored(conn, run_pk, [(w, u.key) for w, u in zip(ROLLUP_WIDTHS, levels,
                                                                                     strict=True)], layout)
    if len(stored):
        stored_key = _level_key(np.searchsorted(ROLLUP_WIDTHS, stored_width), stored.key)
        keep = np.flatnonzero(np.isin(stored_key, batch_key))
        both = concat_units([take_units(stored, keep), batch], layout)
        key = np.concatenate([stored_key[keep], batch_key])
        order = np.argsort(key, kind="stable")
        merged = reduce_units(take_units(both, order), key[order])
    else:
        merged = replace(batch, key=batch_key)  # already in (level, bucket) order, one unit a key
    width_of = np.asarray(ROLLUP_WIDTHS, dtype=np.int64)[merged.key >> _LEVEL_SHIFT]
    merged.key &= (1 << _LEVEL_SHIFT) - 1
    dialect = storage_dialect(conn)
    sql = dialect.upsert_sql("step_rollups", _COLUMNS, _KEY, binary=lambda c: c.startswith("layer_"))
    conn.exec_driver_sql(sql, _rows(run_pk, width_of, merged, dialect))


_LEVEL_SHIFT = 57
"""(level, bucket) as one sortable int64: the level (< 8) in the top bits, a bucket (≤ MAX_STEP // 64 = 2^56)
below them."""


def _level_key(level: I8, bucket: I8) -> I8:
    return (level.astype(np.int64) << _LEVEL_SHIFT) | bucket


_COLUMNS = (*_KEY, *_BASE, *(f"{f}_{s}" for f in (*SCALAR_FIELDS, *LAYER_FIELDS) for s in STATS))


def _none_where(a: npt.NDArray[Any], none: Mask) -> list[Any]:
    out = a.astype(object)
    out[none] = None
    return out.tolist()  # type: ignore[no-any-return]


def _stat_nones(st: FieldStats) -> dict[str, Mask]:
    return {"min": st.min_step == NONE_STEP, "max": st.max_step == NONE_STEP, "min_step": st.min_step == NONE_STEP,
            "max_step": st.max_step == NONE_STEP, "last": st.last_step < 0, "last_step": st.last_step < 0,
            "nonfinite": np.zeros(st.nonfinite.shape, dtype=bool), "nan_step": st.nan_step == NONE_STEP,
            "posinf_step": st.posinf_step == NONE_STEP, "neginf_step": st.neginf_step == NONE_STEP}


def _rows(run_pk: int, width: I8, u: Units, dialect: StorageDialect) -> list[tuple[Any, ...]]:
    """Units (in the full layout) of the given widths as step_rollups rows, in _COLUMNS' order, as the driver
    binds them."""
    k = len(u)
    st = u.stats
    nones = _stat_nones(st)
    columns: list[Sequence[Any]] = [[run_pk] * k, width.tolist(), u.key.tolist(), u.n.tolist(), u.first_step.tolist(),
                                    u.last_step.tolist(), u.time_min.tolist(), u.time_max.tolist()]
    for f in SCALAR_FIELDS:
        c = u.layout[f][0]
        for stat in STATS:
            column = _none_where(getattr(st, stat)[:, c], nones[stat][:, c])
            columns.append(dialect.real_params(column) if stat == "last" else column)  # the one that may be NaN
    n_stats = len(STATS)
    for f in LAYER_FIELDS:  # all of a field's statistics as one (k * n_stats, layers) matrix: one conversion
        a0, b0 = u.layout[f]
        present = np.repeat((st.last_step[:, a0:b0] >= 0).any(axis=1), n_stats)
        m = np.stack([getattr(st, stat)[:, a0:b0] for stat in STATS], axis=1).astype("<f8").reshape(k * n_stats, -1)
        none = np.stack([nones[stat][:, a0:b0] for stat in STATS], axis=1).reshape(k * n_stats, -1)
        arrays = dialect.stat_arrays(m, none, present.tolist())
        columns.extend(arrays[j::n_stats] for j in range(n_stats))
    return list(zip(*columns, strict=True))


# -------------------------------------------------------------------------------------------------- reads

def _scalar_floats(values: Sequence[Any], dialect: StorageDialect) -> F8:
    return np.array([np.nan if v is None else v for v in map(dialect.real_value, values)], dtype=np.float64)


def _stats_from_matrices(k: int, n_cols: int, matrices: Mapping[str, F8]) -> FieldStats:
    """FieldStats from stored statistics as float matrices (NaN = NULL, except in `last`, which its step
    governs); statistics not read stay "none"."""
    st = FieldStats.empty(k, n_cols)
    for stat, a in matrices.items():
        none = np.isnan(a)
        if stat == "min":
            st.min = np.where(none, np.inf, a)
        elif stat == "max":
            st.max = np.where(none, -np.inf, a)
        elif stat == "last":
            st.last = a
        else:
            filled = np.where(none, 0.0, a).astype(np.int64)
            if stat == "last_step":
                filled[none] = -1
            elif stat != "nonfinite":
                filled[none] = NONE_STEP
            setattr(st, stat, filled)
    return st


def _spans_sql(select_list: Sequence[str], mark: str, n_spans: int) -> str:
    """One index range search per span, UNION ALL (an OR of the spans under one `run_pk =` would make SQLite
    walk every rollup row of the run: its plan searches run_pk only, so the cost would grow with the run). The
    spans are parameters, so the text repeats and the driver's prepared statement is reused."""
    one = (f"SELECT {', '.join(select_list)} FROM step_rollups WHERE run_pk = {mark} AND width = {mark} "
           f"AND bucket BETWEEN {mark} AND {mark}")
    return " UNION ALL ".join([one] * n_spans) + " ORDER BY first_step"


def read_units(conn: Connection, run_pk: int, spans: Sequence[tuple[int, int, int]], fields: Mapping[str, int],
               stats: Sequence[str] = STATS, layer_index: Sequence[int] | None = None,
               widths_out: list[int] | None = None) -> Units:
    """Stored buckets of the (width, first bucket, last bucket) spans, in step order, with `fields` (name → its
    column count: 1 for a scalar field, the run's layer count for a per-layer one; only the `layer_index`
    layers when given) and only `stats` read (the rest are "none")."""
    dialect = storage_dialect(conn)
    widths = {f: (len(layer_index) if layer_index is not None and f in LAYER_FIELDS else n)
              for f, n in fields.items()}
    layout = layout_of(widths)
    n_cols = max((b for _, b in layout.values()), default=0)
    if not spans:
        return relayout(step_units([], [], np.empty((0, 0)), None, {}), layout)
    select_list = ["bucket", *_BASE, "width"]
    plan: list[tuple[str, str, int | None]] = []  # (field, stat, layer or None for a whole array)
    one_by_one = _few_layers(layer_index)
    for f in fields:
        for stat in stats:
            column = f"{f}_{stat}"
            if f in LAYER_FIELDS and one_by_one:
                assert layer_index is not None
                for j in layer_index:
                    select_list.append(dialect.element_select(column, j))
                    plan.append((f, stat, j))
            else:  # NULL elements as NaN, which is "none" here too
                select_list.append(dialect.array_select(column, nulls_as_nan=True) if f in LAYER_FIELDS else column)
                plan.append((f, stat, None))
    sql = _spans_sql(select_list, dialect.mark, len(spans))
    params = tuple(v for w, lo, hi in spans for v in (run_pk, int(w), int(lo), int(hi)))
    rows = conn.exec_driver_sql(sql, params).fetchall()
    k = len(rows)
    by_column: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [()] * len(select_list)
    matrices = {stat: np.full((k, n_cols), np.nan) for stat in stats}
    filled: dict[tuple[str, str], int] = {}
    if widths_out is not None:
        widths_out.extend(by_column[6])
    for (f, stat, layer), values in zip(plan, by_column[7:], strict=True):
        a, b = layout[f]
        if f not in LAYER_FIELDS:
            matrices[stat][:, a] = _scalar_floats(values, dialect)
        elif layer is not None:
            at = filled.get((f, stat), 0)
            filled[(f, stat)] = at + 1
            matrices[stat][:, a + at] = dialect.elements_matrix([values])[0][:, 0]
        else:
            full = dialect.arrays_matrix(values, fields[f])[0]
            matrices[stat][:, a:b] = full if layer_index is None else full[:, layer_index]
    base = by_column[:6]
    return Units(key=np.array(base[0], dtype=np.int64), n=np.array(base[1], dtype=np.int64),
                 first_step=np.array(base[2], dtype=np.int64), last_step=np.array(base[3], dtype=np.int64),
                 time_min=np.array(base[4], dtype=np.float64), time_max=np.array(base[5], dtype=np.float64),
                 stats=_stats_from_matrices(k, n_cols, matrices), layout=layout)


def _read_stored(conn: Connection, run_pk: int, keys: Sequence[tuple[int, I8]], layout: Layout) -> tuple[Units, I8]:
    """The stored rows within the (width, the batch's buckets) spans and each row's width, in one query. An
    in-order batch finds at most the bucket it continues, one per level."""
    spans = [(w, int(k[0]), int(k[-1])) for w, k in keys]
    fields = {f: b - a for f, (a, b) in layout.items()}
    widths: list[int] = []
    stored = read_units(conn, run_pk, spans, fields, widths_out=widths)
    return stored, np.array(widths, dtype=np.int64)


def _few_layers(layer_index: Sequence[int] | None) -> bool:
    """Whether to read these layers one element each (a handful) rather than whole arrays."""
    return layer_index is not None and len(layer_index) <= 8


def raw_units(conn: Connection, run_pk: int, lo: int, hi: int, fields: Mapping[str, int],
              layer_index: Sequence[int] | None = None) -> Units:
    """Stored steps lo..hi as units (one a step), see `raw_steps`."""
    return raw_steps(conn, run_pk, lo, hi, fields, layer_index).units()


def raw_steps(conn: Connection, run_pk: int, lo: int, hi: int, fields: Mapping[str, int],
              layer_index: Sequence[int] | None = None) -> Steps:
    """Stored steps lo..hi as units (one a step): a range shorter than the finest rollup level, the edges of a
    range no whole bucket covers, and the backfill of an existing database. A handful of layers is read one
    element each: parsing whole arrays is most of the cost on PostgreSQL."""
    dialect = storage_dialect(conn)
    mark = dialect.mark
    few = _few_layers(layer_index)
    select_list: list[str] = []
    for name in fields:
        if name in LAYER_FIELDS and few:
            assert layer_index is not None
            select_list.extend(dialect.element_select(name, j) for j in layer_index)
        else:
            select_list.append(dialect.array_select(name) if name in LAYER_FIELDS else name)
    sql = (f"SELECT step, time, {', '.join(select_list)} FROM steps WHERE run_pk = {mark} AND step BETWEEN {mark} "
           f"AND {mark} ORDER BY step")
    rows = conn.exec_driver_sql(sql, (run_pk, lo, hi)).fetchall()
    k = len(rows)
    by_column: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [()] * (2 + len(select_list))
    widths = {f: (len(layer_index) if layer_index is not None and f in LAYER_FIELDS else n)
              for f, n in fields.items()}
    layout = layout_of(widths)
    columns: dict[str, tuple[F8, Mask | None]] = {}
    at = 2
    for name in fields:
        if name in LAYER_FIELDS and few:
            n = widths[name]
            columns[name] = dialect.elements_matrix(by_column[at: at + n]) if k else (np.empty((0, n)), None)
            at += n
            continue
        values = by_column[at]
        at += 1
        if name in LAYER_FIELDS:
            if not k:
                v, m = np.empty((0, fields[name])), None
            else:
                v, m = dialect.arrays_matrix(values, fields[name])
            if layer_index is not None:
                v, m = v[:, layer_index], (None if m is None else m[:, layer_index])
            columns[name] = (v, m)
        else:
            column = [dialect.real_value(v) for v in values]
            columns[name] = _scalar_column(column)
    values_m, missing = _matrix(k, layout, columns)
    return Steps(step=np.array(by_column[0], dtype=np.int64), time=np.array(by_column[1], dtype=np.float64),
                 values=values_m, missing=missing, layout=layout)


def roll_up_batch(conn: Connection, run_pk: int, new: StepColumns, n_layers: int, previous_last: int | None, *,
                  defer: bool) -> bool:
    """Merge a batch's new steps (just stored, ascending; `previous_last` the run's last step before them) into
    the rollups as far as its transaction must: those at or below `rolled_up_through` always (late steps: the
    rollups claim every step up to there), the rest unless deferred (then the rollup worker merges them, and
    every step waiting before them, after the commit). True when some were left to the worker."""
    below_all = -1 if previous_last is None else previous_last
    if defer and new.steps[0] > below_all:
        return True  # a plain append: every new step is above the rollups
    through = rolled_up_through(conn, run_pk)
    if not defer and through == below_all:
        update_rollups(conn, run_pk, batch_steps(new, n_layers), n_layers)  # nothing waiting: the batch alone
        return False
    steps = batch_steps(new, n_layers)
    below = np.flatnonzero(steps.step <= through)
    if len(below):
        update_rollups(conn, run_pk, steps.take(below), n_layers)
    if not defer:
        catch_up_rollups(conn, run_pk, n_layers)
    return defer and len(below) < len(steps)


def merge_waiting(conn: Connection, run_pk: int, batches: Sequence[tuple[StepColumns, int]], n_layers: int) -> bool:
    """Merge batches this process stored (plain appends the rollup worker kept in memory, each with the run's
    layer count when it was stored) into the rollups, without reading their steps back, when they are exactly
    the run's stored steps from `rolled_up_through` to their last one (one count; batches merged already are
    dropped). Steps above them (batches committed but not handed over yet) keep waiting. False, with nothing
    merged, when they are not (a step stored by another process or a late one in between): then
    `catch_up_rollups` is the way."""
    through = rolled_up_through(conn, run_pk)
    ordered = sorted((b for b in batches if b[0].steps[-1] > through), key=lambda b: b[0].steps[0])
    if not ordered:
        return True
    mark = storage_dialect(conn).mark
    last = ordered[-1][0].steps[-1]
    stored = conn.exec_driver_sql(f"SELECT count(*) FROM steps WHERE run_pk = {mark} AND step > {mark} AND "
                                  f"step <= {mark}", (run_pk, through, last)).scalar()
    if ordered[0][0].steps[0] <= through or stored != sum(len(b.steps) for b, _ in ordered):
        return False
    update_rollups(conn, run_pk, concat_steps([batch_steps(b, width) for b, width in ordered]), n_layers)
    return True


def rolled_up_through(conn: Connection, run_pk: int) -> int:
    """The highest step the run's rollups hold (-1: none). Every stored step up to it is in them and none after
    it: ingest merges a late step at or below it at once, and `catch_up_rollups` the steps above it. One index
    probe: the last bucket of the coarsest level."""
    mark = storage_dialect(conn).mark
    last = conn.exec_driver_sql(f"SELECT last_step FROM step_rollups WHERE run_pk = {mark} AND width = {mark} "
                                f"ORDER BY bucket DESC LIMIT 1", (run_pk, ROLLUP_WIDTHS[-1])).scalar()
    return -1 if last is None else int(last)


def lagging_runs(conn: Connection) -> list[int]:
    """The runs whose stored steps go beyond their rollups (a process stopped before merging them)."""
    mark = storage_dialect(conn).mark
    rows = conn.exec_driver_sql(
        "SELECT id FROM runs WHERE last_step IS NOT NULL AND last_step > COALESCE((SELECT r.last_step FROM "
        f"step_rollups r WHERE r.run_pk = runs.id AND r.width = {mark} ORDER BY r.bucket DESC LIMIT 1), -1) "
        "ORDER BY id", (ROLLUP_WIDTHS[-1],)).all()
    return [int(r[0]) for r in rows]


def _measured_only(steps: Steps) -> Steps:
    """The same steps without the fields none of them measured (read back, every field is there): the rollups
    take those as unmeasured anyway, and the measured ones alone take the quick way (`bucket_units`)."""
    if steps.missing is None:
        return steps
    kept = {name: (a, b) for name, (a, b) in steps.layout.items() if not steps.missing[:, a:b].all()}
    if len(kept) == len(steps.layout):
        return steps
    columns = np.concatenate([np.arange(a, b) for a, b in kept.values()]) if kept else np.empty(0, dtype=np.intp)
    missing = steps.missing[:, columns]
    return Steps(step=steps.step, time=steps.time, values=steps.values[:, columns],
                 missing=missing if missing.any() else None,
                 layout=layout_of({name: b - a for name, (a, b) in kept.items()}))


def catch_up_rollups(conn: Connection, run_pk: int, n_layers: int, chunk: int = 16_384,
                     max_steps: int | None = None) -> int:
    """Merge the run's stored steps above `rolled_up_through` into its rollups, a chunk of steps at a time, read
    back from the steps table (so whoever catches up needs nothing but the database); the caller holds the run's
    row lock in a write transaction, so no step of the run is stored meanwhile. With `max_steps`, stop after
    about that many (the rest waits for the next call). Returns the steps merged. From an empty step_rollups
    this is the upgrade of a database that has steps but no rollups (migration 0005)."""
    mark = storage_dialect(conn).mark
    through = rolled_up_through(conn, run_pk)
    fields = _all_fields(n_layers)
    merged = 0
    while max_steps is None or merged < max_steps:
        first = conn.exec_driver_sql(f"SELECT step FROM steps WHERE run_pk = {mark} AND step > {mark} "
                                     f"ORDER BY step LIMIT 1", (run_pk, through)).scalar()
        if first is None:
            break
        steps = _measured_only(raw_steps(conn, run_pk, int(first), int(first) + chunk - 1, fields))
        update_rollups(conn, run_pk, steps, n_layers)
        merged += len(steps)
        through = int(steps.step[-1])
    return merged
