"""Raw-step reads: stored steps lo..hi as `Steps` or `Units` (buckets.py), the fields asked for; a handful of layers
read one array element each. What a series reads where no whole rollup bucket covers the range (short ranges,
the edges, the steps above the rollups) and what the rollup worker reads back when it has not the batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection

from gradwatch.wire import LAYER_FIELDS

from .buckets import F8, Mask, Steps, Units, layout_of, scalar_column, values_matrix
from .dialect import storage_dialect

__all__ = ["few_layers", "raw_steps", "raw_units"]


def few_layers(layer_index: Sequence[int] | None) -> bool:
    """Whether to read these layers one element each (a handful) rather than whole arrays."""
    return layer_index is not None and len(layer_index) <= 8


def raw_units(conn: Connection, run_pk: int, lo: int, hi: int, fields: Mapping[str, int],
              layer_index: Sequence[int] | None = None) -> Units:
    """Stored steps lo..hi as units (one a step), see `raw_steps`."""
    return raw_steps(conn, run_pk, lo, hi, fields, layer_index).units()


def raw_steps(conn: Connection, run_pk: int, lo: int, hi: int, fields: Mapping[str, int],
              layer_index: Sequence[int] | None = None) -> Steps:
    """Stored steps lo..hi with `fields` (name → its column count; only the `layer_index` layers when given): a
    range shorter than the finest rollup level, the edges of a range no whole bucket covers, the steps above the
    rollups, the rollup worker's read-back and the backfill of an existing database. A handful of layers is read one
    element each: parsing whole arrays is most of the cost on PostgreSQL."""
    dialect = storage_dialect(conn)
    mark = dialect.mark
    few = few_layers(layer_index)
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
            columns[name] = scalar_column(column)
    values_m, missing = values_matrix(k, layout, columns)
    return Steps(step=np.array(by_column[0], dtype=np.int64), time=np.array(by_column[1], dtype=np.float64),
                 values=values_m, missing=missing, layout=layout)
