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

from gradwatch.wire import LAYER_FIELDS, MISSING_BITS, MISSING_BYTES, SCALAR_FIELDS, pack_floats

from .codec import sqlite_real_out
from .models import ROLLUP_SCALAR_STATS, ROLLUP_WIDTHS
from .pg_arrays import float8_arrays, float8_matrix
from .steps_table import StepColumns

__all__ = ["NONE_STEP", "STATS", "Layout", "FieldStats", "Units", "batch_units", "update_rollups", "rebuild_rollups",
           "read_units", "raw_units", "reduce_units", "concat_units", "take_units", "layout_of", "set_maintenance"]

F8 = npt.NDArray[np.float64]
I8 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]
Layout = dict[str, tuple[int, int]]
"""field → its columns (start, stop) in the statistics' matrices."""

NONE_STEP = np.iinfo(np.int64).max
STATS = ROLLUP_SCALAR_STATS
_FIRST_OF = ("nan_step", "posinf_step", "neginf_step")
_KEY = ("run_pk", "width", "bucket")
_BASE = ("n", "first_step", "last_step", "time_min", "time_max")
_maintained = True


def set_maintenance(on: bool) -> None:
    """Switch rollup maintenance off (bench/query.py's side-by-side measure of what it costs) or back on. A
    database written with it off has wrong rollups: for benchmarks only."""
    global _maintained
    _maintained = on


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


# ----------------------------------------------------------------------------------- values into numpy

def _scalar_column(column: Sequence[Any]) -> tuple[F8, Mask | None]:
    """A scalar column (None = not measured) as floats and the not-measured mask (None when all are measured)."""
    values = np.array(column, dtype=np.float64)  # None becomes NaN; the mask tells them apart
    return values, (np.array([v is None for v in column], dtype=bool) if None in column else None)


def _layer_rows(rows: Sequence[Any], n_cols: int) -> bytes:
    """Per-layer values of steps (lists, blobs, None; shorter ones padded unmeasured) as one step-major section."""
    parts = []
    for r in rows:
        if r is None:
            parts.append(MISSING_BYTES * n_cols)
            continue
        b = r if isinstance(r, bytes) else pack_floats(r)
        parts.append(b[: 8 * n_cols] + MISSING_BYTES * (n_cols - len(b) // 8))
    return b"".join(parts)


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


def _section(section: bytes, n_cols: int) -> tuple[F8, Mask | None]:
    values = np.frombuffer(section, dtype="<f8").reshape(-1, n_cols)
    missing = values.view("<u8") == MISSING_BITS
    return values.astype(np.float64, copy=False), (missing if missing.any() else None)


def batch_units(new: StepColumns, n_layers: int) -> Units:
    """A batch's new steps (ascending) as units, with the fields it carries: whole columns at a time, a binary
    batch's per-layer sections read in place."""
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
            columns[name] = _section(layer_column.section, n_layers)
        else:
            columns[name] = _section(_layer_rows(layer_column.lists(), n_layers), n_layers)
        widths[name] = n_layers
    layout = layout_of(widths)
    values, missing = _matrix(len(new.steps), layout, columns)
    return step_units(new.steps, new.stored_times(), values, missing, layout)


# ----------------------------------------------------------------------------------------- maintenance

def update_rollups(conn: Connection, run_pk: int, new: Units, n_layers: int) -> None:
    """Merge new steps (ascending, none of them stored before) into every level's buckets, in the caller's
    transaction: the batch's buckets are built level by level from the finer one, the stored rows of those
    buckets read, and all levels merged and written back (upsert) at once, keyed by (level, bucket)."""
    if not _maintained or len(new) == 0:
        return
    layout = layout_of(_all_fields(n_layers))
    levels: list[Units] = []
    finer, finer_width = new, 1
    for width in ROLLUP_WIDTHS:
        finer = reduce_units(finer, finer.key // (width // finer_width))
        if finer_width == 1:
            finer = relayout(finer, layout)
        finer_width = width
        levels.append(finer)
    batch = concat_units(levels, layout)
    level_of = np.repeat(np.arange(len(levels), dtype=np.int64), [len(u) for u in levels])
    batch_key = _level_key(level_of, batch.key)
    wanted = [(w, u.key) for w, u in zip(ROLLUP_WIDTHS, levels, strict=True)]
    del levels, finer  # each unit is every layer's statistics: a wide run's copies are what a batch costs
    stored, stored_width = _read_stored(conn, run_pk, wanted, layout)
    if len(stored):
        stored_key = _level_key(np.searchsorted(ROLLUP_WIDTHS, stored_width), stored.key)
        keep = np.flatnonzero(np.isin(stored_key, batch_key))
        both = concat_units([take_units(stored, keep), batch], layout)
        del stored, batch
        key = np.concatenate([stored_key[keep], batch_key])
        order = np.argsort(key, kind="stable")
        both = take_units(both, order)
        merged = reduce_units(both, key[order])
        del both
    else:
        merged = replace(batch, key=batch_key)  # already in (level, bucket) order, one unit a key
    width_of = np.asarray(ROLLUP_WIDTHS, dtype=np.int64)[merged.key >> _LEVEL_SHIFT]
    merged.key &= (1 << _LEVEL_SHIFT) - 1
    conn.exec_driver_sql(_upsert_sql(conn.dialect.name), _rows(run_pk, width_of, merged,
                                                               conn.dialect.name != "postgresql"))


_LEVEL_SHIFT = 57
"""(level, bucket) as one sortable int64: the level (< 8) in the top bits, a bucket (≤ MAX_STEP // 64 = 2^56)
below them."""


def _level_key(level: I8, bucket: I8) -> I8:
    return (level.astype(np.int64) << _LEVEL_SHIFT) | bucket


_COLUMNS = (*_KEY, *_BASE, *(f"{f}_{s}" for f in (*SCALAR_FIELDS, *LAYER_FIELDS) for s in STATS))


def _upsert_sql(dialect: str) -> str:
    cols = ", ".join(_COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c not in _KEY)
    if dialect == "postgresql":
        marks = ", ".join("%b" if c.startswith("layer_") else "%s" for c in _COLUMNS)  # pg_arrays' binary form
    else:
        marks = ", ".join("?" * len(_COLUMNS))
    return (f"INSERT INTO step_rollups ({cols}) VALUES ({marks}) "
            f"ON CONFLICT (run_pk, width, bucket) DO UPDATE SET {updates}")


def _none_where(a: npt.NDArray[Any], none: Mask) -> list[Any]:
    out = a.astype(object)
    out[none] = None
    return out.tolist()  # type: ignore[no-any-return]


def _stat_nones(st: FieldStats) -> dict[str, Mask]:
    return {"min": st.min_step == NONE_STEP, "max": st.max_step == NONE_STEP, "min_step": st.min_step == NONE_STEP,
            "max_step": st.max_step == NONE_STEP, "last": st.last_step < 0, "last_step": st.last_step < 0,
            "nonfinite": np.zeros(st.nonfinite.shape, dtype=bool), "nan_step": st.nan_step == NONE_STEP,
            "posinf_step": st.posinf_step == NONE_STEP, "neginf_step": st.neginf_step == NONE_STEP}


def _rows(run_pk: int, width: I8, u: Units, sqlite: bool) -> list[tuple[Any, ...]]:
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
            a, none = getattr(st, stat)[:, c], nones[stat][:, c]
            if stat == "last" and sqlite:  # SQLite would store a NaN parameter as NULL
                a = a.astype(object)
                a[np.isnan(a.astype(np.float64)) & ~none] = "NaN"
            columns.append(_none_where(a, none))
    n_stats = len(STATS)
    for f in LAYER_FIELDS:  # all of a field's statistics as one (k * n_stats, layers) matrix: one conversion
        a0, b0 = u.layout[f]
        present = np.repeat((st.last_step[:, a0:b0] >= 0).any(axis=1), n_stats)
        m = np.stack([getattr(st, stat)[:, a0:b0] for stat in STATS], axis=1).astype("<f8").reshape(k * n_stats, -1)
        none = np.stack([nones[stat][:, a0:b0] for stat in STATS], axis=1).reshape(k * n_stats, -1)
        if sqlite:
            m.view("<u8")[none] = MISSING_BITS
            arrays: list[Any] = [row.tobytes() if ok else None for row, ok in zip(m, present.tolist(), strict=True)]
        else:
            arrays = float8_arrays(m, none, present)
        columns.extend(arrays[j::n_stats] for j in range(n_stats))
    return list(zip(*columns, strict=True))


# -------------------------------------------------------------------------------------------------- reads

def _element(conn: Connection, column: str, j: int) -> str:
    """One layer's value of a stored array, in SQL (an 8-byte blob on SQLite, a float on PostgreSQL)."""
    return f"{column}[{j + 1}]" if conn.dialect.name == "postgresql" else f"substr({column}, {8 * j + 1}, 8)"


def _layer_matrix(values: Sequence[Any], n_cols: int) -> F8:
    """Stored arrays (blobs or lists, NULL or shorter than n_cols) as a (k, n_cols) matrix, NaN for NULL."""
    if values and all(type(v) is bytes and len(v) == 8 * n_cols for v in values):  # noqa: E721 - the usual case
        a = np.frombuffer(b"".join(values), dtype="<f8").reshape(len(values), n_cols)
        return np.where(a.view("<u8") == MISSING_BITS, np.nan, a)
    out = np.full((len(values), n_cols), np.nan)
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, bytes):
            a = np.frombuffer(v, dtype="<f8")[:n_cols]
            a = np.where(a.view("<u8") == MISSING_BITS, np.nan, a)
        else:
            a = np.array(v[:n_cols], dtype=np.float64)
        out[i, : len(a)] = a
    return out


def _scalar_floats(values: Sequence[Any], sqlite: bool) -> F8:
    if sqlite:
        values = [sqlite_real_out(v) if isinstance(v, str) else v for v in values]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


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
    sqlite = conn.dialect.name != "postgresql"
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
                    select_list.append(_element(conn, column, j))
                    plan.append((f, stat, j))
            else:  # NULL elements as NaN, which is "none" here too: array_send's form stays fixed-size
                select_list.append(column if sqlite or f not in LAYER_FIELDS else
                                   f"array_send(array_replace({column}, NULL, 'NaN'::float8))")
                plan.append((f, stat, None))
    sql = _spans_sql(select_list, "?" if sqlite else "%s", len(spans))
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
            matrices[stat][:, a] = _scalar_floats(values, sqlite)
        elif layer is not None:
            at = filled.get((f, stat), 0)
            filled[(f, stat)] = at + 1
            if sqlite:
                matrices[stat][:, a + at] = _layer_matrix([v if v else None for v in values], 1)[:, 0]
            else:
                matrices[stat][:, a + at] = [np.nan if v is None else v for v in values]
        else:
            full = _layer_matrix(values, fields[f]) if sqlite else float8_matrix(values, fields[f])[0]
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


def _element_matrix(columns: Sequence[Sequence[Any]], sqlite: bool) -> tuple[F8, Mask | None]:
    """Elements read one layer a column (8-byte blobs on SQLite, floats on PostgreSQL; None or an empty blob
    where not measured) as a (k, layers) matrix and its not-measured mask."""
    if sqlite:
        section = b"".join(v if v else MISSING_BYTES for row in zip(*columns, strict=True) for v in row)
        return _section(section, len(columns))
    values = np.empty((len(columns[0]) if columns else 0, len(columns)))
    missing = None
    for j, column in enumerate(columns):
        values[:, j] = np.array(column, dtype=np.float64)  # None becomes NaN; the mask tells them apart
        if None in column:
            if missing is None:
                missing = np.zeros(values.shape, dtype=bool)
            missing[:, j] = [v is None for v in column]
    return values, missing


def raw_units(conn: Connection, run_pk: int, lo: int, hi: int, fields: Mapping[str, int],
              layer_index: Sequence[int] | None = None) -> Units:
    """Stored steps lo..hi as units (one a step): a range shorter than the finest rollup level, the edges of a
    range no whole bucket covers, and the backfill of an existing database. A handful of layers is read one
    element each: parsing whole arrays is most of the cost on PostgreSQL."""
    sqlite = conn.dialect.name != "postgresql"
    mark = "?" if sqlite else "%s"
    few = _few_layers(layer_index)
    select_list: list[str] = []
    for name in fields:
        if name in LAYER_FIELDS and few:
            assert layer_index is not None
            select_list.extend(_element(conn, name, j) for j in layer_index)
        else:
            select_list.append(name if sqlite or name not in LAYER_FIELDS else f"array_send({name})")
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
            columns[name] = _element_matrix(by_column[at: at + n], sqlite) if k else (np.empty((0, n)), None)
            at += n
            continue
        values = by_column[at]
        at += 1
        if name in LAYER_FIELDS:
            if not k:
                v, m = np.empty((0, fields[name])), None
            elif sqlite:
                v, m = _section(_layer_rows(values, fields[name]), fields[name])
            else:
                v, m = float8_matrix(values, fields[name])
            if layer_index is not None:
                v, m = v[:, layer_index], (None if m is None else m[:, layer_index])
            columns[name] = (v, m)
        else:
            column = [sqlite_real_out(v) if isinstance(v, str) else v for v in values] if sqlite else list(values)
            columns[name] = _scalar_column(column)
    values_m, missing = _matrix(k, layout, columns)
    return step_units(np.array(by_column[0], dtype=np.int64), np.array(by_column[1], dtype=np.float64), values_m,
                      missing, layout)


def rebuild_rollups(conn: Connection, run_pk: int, n_layers: int, chunk: int = 16_384) -> None:
    """Compute a run's rollups from its stored steps (the upgrade of a database that has steps but no rollups):
    the maintenance path, a chunk of steps at a time."""
    mark = "?" if conn.dialect.name != "postgresql" else "%s"
    last = conn.exec_driver_sql(f"SELECT max(step) FROM steps WHERE run_pk = {mark}", (run_pk,)).scalar()
    if last is None:
        return
    fields = _all_fields(n_layers)
    for lo in range(0, int(last) + 1, chunk):
        units = raw_units(conn, run_pk, lo, lo + chunk - 1, fields)
        if len(units):
            update_rollups(conn, run_pk, units, n_layers)
