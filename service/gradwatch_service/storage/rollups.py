"""Step rollups: the step_rollups table's writes (merging steps into every level) and its reads.

A level of width w keeps one row per bucket of w steps (bucket = step // w) with, per scalar field and per layer
of each per-layer field, the statistics a spike-keeping downsample needs (queries.py), computed in numpy by
buckets.py: a batch's buckets are built from its steps and merged with the stored rows, and each coarser level
is built from the finer one (each width is a multiple of the one before). A statistic that is "none" in memory
is NULL in the table (a NULL element of a PostgreSQL array, the not-measured sentinel in a SQLite blob); a
per-layer field with nothing measured in a bucket is a NULL array. The rollup worker (rollup_worker.py) merges
acknowledged steps after their commit; `rolled_up_through` says how far a run's rollups hold every step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection

from gradwatch.wire import LAYER_FIELDS, SCALAR_FIELDS

from .buckets import (
    F8,
    I8,
    NONE_STEP,
    STATS,
    FieldStats,
    Layout,
    Mask,
    Steps,
    Units,
    all_fields,
    batch_steps,
    bucket_units,
    concat_steps,
    concat_units,
    layout_of,
    measured_only,
    reduce_units,
    relayout,
    step_units,
    take_units,
)
from .dialect import StorageDialect, storage_dialect
from .models import ROLLUP_WIDTHS
from .raw_steps import few_layers, raw_steps
from .steps_table import StepColumns

__all__ = ["update_rollups", "roll_up_batch", "merge_waiting", "batch_values", "read_units", "rolled_up_through",
           "catch_up_rollups", "lagging_runs"]

_KEY = ("run_pk", "width", "bucket")
_BASE = ("n", "first_step", "last_step", "time_min", "time_max")


# ----------------------------------------------------------------------------------------- maintenance

def update_rollups(conn: Connection, run_pk: int, new: Steps, n_layers: int) -> None:
    """Merge new steps (ascending, none of them stored before) into every level's buckets, in the caller's
    transaction: the batch's buckets are built level by level from the finer one, the stored rows of those
    buckets read, and all levels merged and written back (upsert) at once, keyed by (level, bucket)."""
    if len(new) == 0:
        return
    layout = layout_of(all_fields(n_layers))
    finer, finer_width = relayout(bucket_units(new, ROLLUP_WIDTHS[0]), layout), ROLLUP_WIDTHS[0]
    levels: list[Units] = [finer]
    for width in ROLLUP_WIDTHS[1:]:
        finer = reduce_units(finer, finer.key // (width // finer_width))
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
        at = np.minimum(np.searchsorted(batch_key, stored_key), len(batch_key) - 1)  # batch_key is ascending
        keep = np.flatnonzero(batch_key[at] == stored_key)
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
    one_by_one = few_layers(layer_index)
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


def merge_waiting(conn: Connection, run_pk: int, batches: Sequence[tuple[StepColumns, int]], n_layers: int,
                  max_values: int | None = None) -> bool:
    """Merge batches this process stored (plain appends the rollup worker kept in memory, each with the run's
    layer count when it was stored) into the rollups, without reading their steps back, when they are exactly
    the run's stored steps from `rolled_up_through` to their last one (one count; batches merged already are
    dropped). Steps above them (batches committed but not handed over yet) keep waiting. False, with nothing
    merged, when they are not (a step stored by another process or a late one in between): then
    `catch_up_rollups` is the way. With `max_values`, they are merged in consecutive groups of at most that many
    values (steps × layers; a bigger batch alone), which bounds the merge's memory."""
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
    for group in _groups(ordered, max_values):
        update_rollups(conn, run_pk, concat_steps([batch_steps(b, width) for b, width in group]), n_layers)
    return True


def batch_values(batch: tuple[StepColumns, int]) -> int:
    """What a batch held for the rollups weighs: its steps × the run's layers (at least one)."""
    return len(batch[0].steps) * max(1, batch[1])


def _groups(batches: list[tuple[StepColumns, int]], max_values: int | None) -> list[list[tuple[StepColumns, int]]]:
    """Consecutive batches in groups of at most `max_values` values each (a bigger batch alone)."""
    if max_values is None:
        return [batches]
    groups: list[list[tuple[StepColumns, int]]] = [[]]
    held = 0
    for b in batches:
        values = batch_values(b)
        if groups[-1] and held + values > max_values:
            groups.append([])
            held = 0
        groups[-1].append(b)
        held += values
    return groups


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


def catch_up_rollups(conn: Connection, run_pk: int, n_layers: int, chunk: int = 16_384,
                     max_steps: int | None = None) -> int:
    """Merge the run's stored steps above `rolled_up_through` into its rollups, a chunk of steps at a time, read
    back from the steps table (so whoever catches up needs nothing but the database); the caller holds the run's
    row lock in a write transaction, so no step of the run is stored meanwhile. With `max_steps`, stop after
    about that many (the rest waits for the next call). Returns the steps merged. From an empty step_rollups
    this is the upgrade of a database that has steps but no rollups (migration 0005)."""
    mark = storage_dialect(conn).mark
    through = rolled_up_through(conn, run_pk)
    fields = all_fields(n_layers)
    merged = 0
    while max_steps is None or merged < max_steps:
        first = conn.exec_driver_sql(f"SELECT step FROM steps WHERE run_pk = {mark} AND step > {mark} "
                                     f"ORDER BY step LIMIT 1", (run_pk, through)).scalar()
        if first is None:
            break
        steps = measured_only(raw_steps(conn, run_pk, int(first), int(first) + chunk - 1, fields))
        update_rollups(conn, run_pk, steps, n_layers)
        merged += len(steps)
        through = int(steps.step[-1])
    return merged
