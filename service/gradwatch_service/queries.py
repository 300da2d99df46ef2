"""Reads for the query API: runs, a run's raw steps, and a run's series with spike-keeping downsampling (from the
step rollups when the range is long enough, so the cost follows the points asked for, not the run's length)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, func, select

from gradwatch.wire import LAYER_FIELDS

from .errors import InvalidInput, RunNotFound
from .limits import InputLimits
from .read_bounds import check_documents, check_raw_read, fetch_in_parts
from .schemas import Incident, RunListed, RunPublic, Series, StepOut
from .storage.buckets import NONE_STEP, FieldStats, concat_units, reduce_units, take_units
from .storage.dialect import aware_utc, decode_scalars, storage_dialect
from .storage.models import FLAG_LATE, FLAG_SKIPPED, ROLLUP_WIDTHS, incidents, projects, runs, steps
from .storage.raw_steps import raw_units
from .storage.rollups import read_units, rolled_up_through

__all__ = ["get_run", "get_visible_run", "visible_run_row", "list_runs", "read_steps", "read_series",
           "plan_downsample", "Downsample", "list_incidents", "UnknownLayer"]

_RUN_COLUMNS = (runs.c.id, runs.c.run_id, projects.c.name.label("project"), runs.c.name, runs.c.status,
                runs.c.config, runs.c.meta, runs.c.layer_names, runs.c.last_step, runs.c.n_steps,
                runs.c.created_at, runs.c.updated_at)


class UnknownLayer(InvalidInput):
    """A series asked for a layer the run does not have."""

    def __init__(self, message: str) -> None:
        super().__init__(["query", "layers"], message)


def _run_query() -> Any:
    return select(*_RUN_COLUMNS).join(projects, projects.c.id == runs.c.project_id)


def _run_public(row: Any) -> RunPublic:
    return RunPublic(run_id=row.run_id, project=row.project, name=row.name, status=row.status,
                     config=row.config, meta=row.meta, layers=list(row.layer_names),
                     n_layers=len(row.layer_names), last_step=row.last_step, n_steps=row.n_steps,
                     created_at=aware_utc(row.created_at), updated_at=aware_utc(row.updated_at))


def get_run_row(conn: Connection, run_id: str) -> Any:
    return conn.execute(_run_query().where(runs.c.run_id == run_id)).first()


def get_run(conn: Connection, run_id: str) -> RunPublic | None:
    row = get_run_row(conn, run_id)
    return None if row is None else _run_public(row)


def visible_run_row(conn: Connection, run_id: str, sees: Callable[[str], bool]) -> Any:
    """The run's row for a reader who `sees` some projects; RunNotFound when there is none or it is of a project
    the reader does not see: the one lookup behind every read of one run."""
    row = get_run_row(conn, run_id)
    if row is None or not sees(row.project):
        raise RunNotFound(run_id, to_write=False)
    return row


def get_visible_run(conn: Connection, run_id: str, sees: Callable[[str], bool]) -> RunPublic:
    return _run_public(visible_run_row(conn, run_id, sees))


def _equal_to(*filters: tuple[Any, Any]) -> list[Any]:
    """`column == value` for each filter the caller gave (value not None)."""
    return [column == value for column, value in filters if value is not None]


def _layer_count(conn: Connection) -> Any:
    """The length of the run's stored layer list, counted by the database (the names never reach Python)."""
    return storage_dialect(conn).json_array_length(runs.c.layer_names).label("n_layers")


def _since_utc(t: datetime) -> datetime:
    """An `updated_since` in UTC; one so near year 1 or 9999 that UTC is outside datetime's range is clamped to
    its end (no run is older than year 1 UTC or newer than 9999)."""
    if t.tzinfo is None:
        return t.replace(tzinfo=UTC)
    try:
        return t.astimezone(UTC)
    except OverflowError:
        return (datetime.min if t.year == 1 else datetime.max).replace(tzinfo=UTC)


def list_runs(conn: Connection, *, project: str | None = None, status: str | None = None,
              updated_since: datetime | None = None, limit: int = 100, offset: int = 0,
              limits: InputLimits | None = None) -> tuple[list[RunListed], int]:
    """A page of runs, each with its layer count (not its names); with `limits`, refused when their config and
    meta would add up to more than GRADWATCH_MAX_RESPONSE_BYTES."""
    columns = [c for c in _RUN_COLUMNS if c is not runs.c.layer_names]
    q = select(*columns, _layer_count(conn)).join(projects, projects.c.id == runs.c.project_id)
    count_q = select(func.count()).select_from(runs.join(projects, projects.c.id == runs.c.project_id))
    conditions = _equal_to((projects.c.name, project), (runs.c.status, status))
    if updated_since is not None:  # stored in UTC (naive on SQLite): compare in UTC whatever offset was given
        conditions.append(runs.c.updated_at >= _since_utc(updated_since))
    q, count_q = q.where(*conditions), count_q.where(*conditions)
    order = (runs.c.updated_at.desc(), runs.c.id.desc())
    if limits is not None:
        page = (select(runs.c.id).join(projects, projects.c.id == runs.c.project_id).where(*conditions)
                .order_by(*order).limit(limit).offset(offset))
        check_documents(conn, limits, page, "ask for fewer runs at a time (limit)")
    rows = conn.execute(q.order_by(*order).limit(limit).offset(offset))
    listed = [RunListed(run_id=r.run_id, project=r.project, name=r.name, status=r.status, config=r.config,
                        meta=r.meta, n_layers=r.n_layers, last_step=r.last_step, n_steps=r.n_steps,
                        created_at=aware_utc(r.created_at), updated_at=aware_utc(r.updated_at)) for r in rows]
    return listed, int(conn.execute(count_q).scalar_one())


def _step_range(q: Any, start: int | None, end: int | None) -> Any:
    if start is not None:
        q = q.where(steps.c.step >= start)
    if end is not None:
        q = q.where(steps.c.step <= end)
    return q


_STEP_VALUES = 6
"""step, time, loss, grad_norm, lr, update_norm: the values of a StepOut besides its per-layer arrays and scalars"""
_STEPS_ADVICE = "ask for fewer steps (limit, or a narrower start..end)"
DEFAULT_STEPS_PAGE = 10_000


def default_steps_limit(n_layers: int, limits: InputLimits) -> int:
    """The page /steps serves when no `limit` is asked: 10,000 steps, or as many as
    GRADWATCH_MAX_RESPONSE_VALUES allows of a run this wide (its extra scalars aside)."""
    return max(1, min(DEFAULT_STEPS_PAGE, limits.max_response_values // (_STEP_VALUES + len(LAYER_FIELDS) * n_layers)))


def read_steps(conn: Connection, run_pk: int, *, start: int | None, end: int | None, limit: int,
               n_layers: int = 0, limits: InputLimits | None = None) -> list[StepOut]:
    """Up to `limit` steps; with `limits`, refused before reading when the rows' values (`n_layers` a per-layer
    field) would pass GRADWATCH_MAX_RESPONSE_VALUES, and while reading when their extra scalars take it past."""
    if limits is not None:
        check_raw_read(conn, limits, run_pk, start, end, _STEP_VALUES + len(LAYER_FIELDS) * n_layers, limit,
                       _STEPS_ADVICE)
    q = _step_range(select(steps).where(steps.c.run_pk == run_pk), start, end).order_by(steps.c.step).limit(limit)
    out: list[StepOut] = []
    n_values = 0
    for r in conn.execute(q, execution_options=fetch_in_parts(limit, _STEP_VALUES + len(LAYER_FIELDS) * n_layers)):
        scalars = decode_scalars(r.scalars)
        if limits is not None:
            n_values += _STEP_VALUES + len(LAYER_FIELDS) * n_layers + len(scalars or ())
            limits.check_response_values(["query", "limit"], n_values, _STEPS_ADVICE, at_least=True)
        out.append(StepOut(step=r.step, time=r.time, loss=r.loss, grad_norm=r.grad_norm, lr=r.lr,
                           update_norm=r.update_norm, layer_grad_norms=r.layer_grad_norms,
                           layer_weight_norms=r.layer_weight_norms, layer_update_norms=r.layer_update_norms,
                           scalars=scalars, skipped=bool(r.flags & FLAG_SKIPPED), late=bool(r.flags & FLAG_LATE)))
    return out


def read_series(conn: Connection, run_pk: int, run_layers: Sequence[str], *, fields: Sequence[str],
                layers: Sequence[str] | None, start: int | None, end: int | None,
                max_points: int | None, limits: InputLimits | None = None) -> list[Series]:
    """One series per scalar field, and one per (per-layer field, layer). With `limits`, refused before reading
    when the answer (downsampled: its most points; raw: every value of the rows read) would pass
    GRADWATCH_MAX_RESPONSE_VALUES."""
    wanted_layers = list(run_layers) if layers is None else list(layers)
    position = {name: i for i, name in enumerate(run_layers)}
    missing = [name for name in wanted_layers if name not in position]
    if missing:
        raise UnknownLayer(f"unknown layer(s) {missing[:5]}; this run has {len(run_layers)} layers")
    n_layer_fields = sum(f in LAYER_FIELDS for f in fields)
    if max_points is not None:
        plan = plan_downsample(conn, run_pk, start, end, max_points)
        if plan is not None:
            if limits is not None:  # a group shows at most its min, max and one of each non-finite kind
                n_series = len(fields) - n_layer_fields + n_layer_fields * len(wanted_layers)
                limits.check_response_values(["query"], 5 * plan.groups * n_series, _SERIES_ADVICE)
            return _downsampled(conn, run_pk, plan, fields, wanted_layers, [position[name] for name in wanted_layers],
                                len(run_layers))
    most_rows = MAX_ROWS if max_points is None else max_points  # not downsampled: the range has no more steps
    if limits is not None:  # a row holds every layer of a per-layer field, whichever are asked for
        check_raw_read(conn, limits, run_pk, start, end, 1 + len(fields) + n_layer_fields * (len(run_layers) - 1),
                       most_rows, _SERIES_ADVICE)
    columns = [steps.c.step] + [steps.c[f] for f in fields]
    q = _step_range(select(*columns).where(steps.c.run_pk == run_pk), start, end).order_by(steps.c.step)
    rows = conn.execute(q, execution_options=fetch_in_parts(most_rows, 1 + len(fields) + n_layer_fields * (
        len(run_layers) - 1))).all()
    step_list = [r[0] for r in rows]
    out: list[Series] = []
    for j, f in enumerate(fields, start=1):
        if f in LAYER_FIELDS:
            for name in wanted_layers:
                i = position[name]
                values = [None if r[j] is None or i >= len(r[j]) else r[j][i] for r in rows]
                out.append(Series(field=f, layer=name, steps=step_list, values=values))
        else:
            out.append(Series(field=f, layer=None, steps=step_list, values=[r[j] for r in rows]))
    return out


_SERIES_ADVICE = "ask for a narrower start..end, fewer fields or layers, or fewer points (max_points)"
MAX_ROWS = 1 << 62
"""no row count of its own bounds a raw series read: only the values it would read"""


@dataclass(frozen=True)
class Downsample:
    """How a downsampled series is read: `groups` groups of equal step span over lo..hi, built from whole
    buckets of the `spans` (width, first bucket, last bucket) and the raw steps of `raw` (lo, hi) at the edges,
    or from raw steps alone (no spans, width 1) when the range is shorter than the finest level allows."""

    lo: int
    hi: int
    groups: int
    width: int
    spans: list[tuple[int, int, int]]
    raw: list[tuple[int, int]]


def _edge_step(conn: Connection, run_pk: int, start: int | None, end: int | None, last: bool) -> int | None:
    """The first (or last) stored step in the range: one index probe (min() and max() together would scan)."""
    q = _step_range(select(steps.c.step).where(steps.c.run_pk == run_pk), start, end)
    return conn.execute(q.order_by(steps.c.step.desc() if last else steps.c.step).limit(1)).scalar()


def plan_downsample(conn: Connection, run_pk: int, start: int | None, end: int | None,
                    max_points: int) -> Downsample | None:
    """The coarsest rollup level that still has max_points // 2 buckets (each gives a minimum and a maximum)
    over the stored steps of the range; raw steps grouped alike when even the finest has fewer; None when the
    range holds no more steps than points (then every step is shown)."""
    lo = _edge_step(conn, run_pk, start, end, last=False)
    hi = _edge_step(conn, run_pk, start, end, last=True)
    if lo is None or hi is None:
        return None
    groups = max(1, max_points // 2)
    span = hi - lo + 1
    if span <= max_points:
        return None
    usable = [i for i, w in enumerate(ROLLUP_WIDTHS) if span // w >= groups]
    if not usable:
        return Downsample(lo=lo, hi=hi, groups=groups, width=1, spans=[], raw=[(lo, hi)])
    spans: list[tuple[int, int, int]] = []
    raw: list[tuple[int, int]] = []
    through = rolled_up_through(conn, run_pk)  # read before the rollups: they may only have grown since
    _cover(lo, min(hi, through), usable[-1], spans, raw)
    if hi > through:  # acknowledged steps the rollup worker has not merged yet: read as they are stored
        raw.append((max(lo, through + 1), hi))
    return Downsample(lo=lo, hi=hi, groups=groups, width=ROLLUP_WIDTHS[usable[-1]], spans=spans, raw=raw)


def _cover(lo: int, hi: int, level: int, spans: list[tuple[int, int, int]], raw: list[tuple[int, int]]) -> None:
    """Cover steps lo..hi with the whole buckets of `level` in the middle, finer levels' whole buckets towards
    the edges, and raw steps (fewer than the finest width on each side) at the very edges."""
    if lo > hi:
        return
    if level < 0:
        raw.append((lo, hi))
        return
    w = ROLLUP_WIDTHS[level]
    first, last = -(-lo // w), (hi + 1) // w - 1  # whole buckets inside lo..hi
    if first > last:
        _cover(lo, hi, level - 1, spans, raw)
        return
    _cover(lo, first * w - 1, level - 1, spans, raw)
    spans.append((w, first, last))
    _cover((last + 1) * w, hi, level - 1, spans, raw)


_READ_STATS = ("min", "max", "min_step", "max_step", "nan_step", "posinf_step", "neginf_step")
"""What a downsampled series needs of a bucket: the points it shows, each at its step."""


def _downsampled(conn: Connection, run_pk: int, plan: Downsample, fields: Sequence[str], layer_names: list[str],
                 layer_index: list[int], n_layers: int) -> list[Series]:
    """Each group of equal step span keeps its finite minimum and maximum and its first NaN, +Infinity and
    -Infinity, at their steps (a plain average would hide a spike among ordinary steps, and NaN would poison
    it); a group is whole buckets and raw steps, merged as rollups merge."""
    columns = {f: (n_layers if f in LAYER_FIELDS else 1) for f in dict.fromkeys(fields)}
    parts = [read_units(conn, run_pk, plan.spans, columns, _READ_STATS, layer_index)]
    parts += [raw_units(conn, run_pk, a, b, columns, layer_index) for a, b in plan.raw]
    filled = [p for p in parts if len(p)]
    if len(filled) == 1:  # raw steps alone (a short range), or buckets alone: already in step order
        units = filled[0]
    else:
        units = concat_units(parts, parts[0].layout)
        units = take_units(units, np.argsort(units.first_step, kind="stable"))
    grouped = reduce_units(units, (units.first_step - plan.lo) * plan.groups // (plan.hi - plan.lo + 1))
    out: list[Series] = []
    for f in fields:
        at = grouped.layout[f][0]
        if f in LAYER_FIELDS:
            out.extend(_points(f, name, grouped.stats, at + j) for j, name in enumerate(layer_names))
        else:
            out.append(_points(f, None, grouped.stats, at))
    return out


def _points(field: str, layer: str | None, st: FieldStats, j: int) -> Series:
    """A group's points, in step order: its minimum, maximum and first of each non-finite kind."""
    k = len(st.min)
    step_list = np.stack([st.min_step[:, j], st.max_step[:, j], st.nan_step[:, j], st.posinf_step[:, j],
                          st.neginf_step[:, j]], axis=1).ravel()
    values = np.stack([st.min[:, j], st.max[:, j], np.full(k, np.nan), np.full(k, np.inf), np.full(k, -np.inf)],
                      axis=1).ravel()
    shown = step_list != NONE_STEP
    step_list, first = np.unique(step_list[shown], return_index=True)
    return Series(field=field, layer=layer, steps=step_list.tolist(), values=values[shown][first].tolist())


def list_incidents(conn: Connection, *, project: str | None = None, run_pk: int | None = None,
                   run_id: str | None = None, status: str | None = None, severity: str | None = None,
                   seqs: Sequence[int] | None = None, limit: int = 100,
                   offset: int = 0) -> tuple[list[Incident], int]:
    """Incidents, most recently updated first."""
    joined = incidents.join(runs, runs.c.id == incidents.c.run_pk).join(projects, projects.c.id == runs.c.project_id)
    q = select(incidents, runs.c.run_id, projects.c.name.label("project")).select_from(joined)
    count_q = select(func.count()).select_from(joined)
    conditions = _equal_to((projects.c.name, project), (incidents.c.run_pk, run_pk), (runs.c.run_id, run_id),
                           (incidents.c.status, status), (incidents.c.severity, severity))
    if seqs is not None:
        conditions.append(incidents.c.seq.in_(list(seqs)))
    q, count_q = q.where(*conditions), count_q.where(*conditions)
    q = q.order_by(incidents.c.updated_at.desc(), incidents.c.run_pk, incidents.c.seq.desc())
    q = q.limit(limit).offset(offset)
    out = [
        Incident(id=f"{r.run_id}#{r.seq}", run_id=r.run_id, project=r.project, seq=r.seq, signature=r.signature,
                 severity=r.severity, status=r.status, opened_step=r.opened_step, last_step=r.last_step,
                 resolved_step=r.resolved_step, layer=r.layer, value=r.value, baseline=r.baseline,
                 message=r.message, evidence=r.evidence, opened_at=aware_utc(r.opened_at),
                 updated_at=aware_utc(r.updated_at),
                 resolved_at=None if r.resolved_at is None else aware_utc(r.resolved_at))
        for r in conn.execute(q)
    ]
    return out, int(conn.execute(count_q).scalar_one())
