"""Bucket statistics: what a spike-keeping downsample keeps of a run of steps, in numpy, whole matrices at a time.

Every statistic merges exactly (min of mins, first of firsts, the last of the highest step), so buckets are built
from steps, merged with stored ones, and each coarser level built from the finer one. In memory, k units (steps,
buckets or groups of buckets) are `Units`: each statistic one (k, C) numpy matrix whose C columns are every
field's values side by side (`Layout`: a scalar field one column, a per-layer field one per layer), so a level
costs a few dozen whole-matrix operations whatever the fields. "None" is a sentinel there: +Inf for a missing
minimum, -Inf for a missing maximum, NONE_STEP for a missing step, -1 for a missing last step. `Steps` are steps
before any statistic is taken (a batch's, or stored ones read back): what the finest buckets are built from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gradwatch.wire import LAYER_FIELDS, SCALAR_FIELDS

from .dialect import float_rows, float_section
from .models import ROLLUP_SCALAR_STATS
from .steps_table import StepColumns

__all__ = ["F8", "I8", "Mask", "Layout", "NONE_STEP", "STATS", "FieldStats", "Units", "Steps", "all_fields",
           "batch_steps", "bucket_units", "concat_steps", "concat_units", "layout_of", "measured_only",
           "reduce_units", "relayout", "scalar_column", "step_units", "take_units", "values_matrix"]

F8 = npt.NDArray[np.float64]
I8 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]
Layout = dict[str, tuple[int, int]]
"""field → its columns (start, stop) in the statistics' matrices."""

NONE_STEP = np.iinfo(np.int64).max
STATS = ROLLUP_SCALAR_STATS
"""The statistics a bucket keeps of each value (models.ROLLUP_SCALAR_STATS)."""
def layout_of(fields: Mapping[str, int]) -> Layout:
    """Columns for fields of the given widths, side by side in the mapping's order."""
    out, at = {}, 0
    for name, width in fields.items():
        out[name] = (at, at + width)
        at += width
    return out


def all_fields(n_layers: int) -> dict[str, int]:
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
    usual case), straight from the values, in a few passes: each bucket's rows side by side as one (buckets,
    rows, C) grid, its minimum and maximum along the rows and their steps the first rows equal to them (a short
    bucket's grid is filled up with copies of its first row, which move no minimum or maximum and come after it);
    otherwise the general way, `reduce_units` of one unit a step."""
    key = steps.step // width
    v = steps.values
    if steps.missing is not None or not np.isfinite(v).all():
        return reduce_units(steps.units(), key)
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    ends = np.append(starts[1:], len(key)) - 1
    lengths = ends - starts + 1
    k, n_buckets, longest = len(key), len(starts), int(lengths.max())
    if n_buckets * longest == k:  # every bucket as long: the rows are the grid already
        rows = np.arange(k).reshape(n_buckets, longest)
    else:
        rows = np.repeat(starts, longest).reshape(n_buckets, longest)
        rows[np.repeat(np.arange(n_buckets), lengths), np.arange(k) - np.repeat(starts, lengths)] = np.arange(k)
    grid = v[rows]
    vmin, vmax = grid.min(axis=1), grid.max(axis=1)
    lowest, highest = (grid == vmin[:, None, :]).argmax(axis=1), (grid == vmax[:, None, :]).argmax(axis=1)
    at = steps.step[rows]
    bucket = np.arange(n_buckets)[:, None]
    shape = lowest.shape
    stats = FieldStats(min=vmin, max=vmax, min_step=at[bucket, lowest], max_step=at[bucket, highest], last=v[ends],
                       last_step=np.repeat(steps.step[ends][:, None], shape[1], axis=1),
                       nonfinite=np.zeros(shape, dtype=np.int64), nan_step=np.full(shape, NONE_STEP),
                       posinf_step=np.full(shape, NONE_STEP), neginf_step=np.full(shape, NONE_STEP))
    return Units(key=key[starts], n=lengths.astype(np.int64), first_step=steps.step[starts],
                 last_step=steps.step[ends], time_min=np.minimum.reduceat(steps.time, starts),
                 time_max=np.maximum.reduceat(steps.time, starts), stats=stats, layout=steps.layout)


# ----------------------------------------------------------------------------------- values into numpy

def scalar_column(column: Sequence[Any]) -> tuple[F8, Mask | None]:
    """A scalar column (None = not measured) as floats and the not-measured mask (None when all are measured)."""
    values = np.array(column, dtype=np.float64)  # None becomes NaN; the mask tells them apart
    return values, (np.array([v is None for v in column], dtype=bool) if None in column else None)


def values_matrix(k: int, layout: Layout, columns: Mapping[str, tuple[F8, Mask | None]]) -> tuple[F8, Mask | None]:
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
            columns[name], widths[name] = scalar_column(column), 1
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
    values, missing = values_matrix(len(new.steps), layout, columns)
    return Steps(step=np.asarray(new.steps, dtype=np.int64), time=np.asarray(new.stored_times(), dtype=np.float64),
                 values=values, missing=missing, layout=layout)


def measured_only(steps: Steps) -> Steps:
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
