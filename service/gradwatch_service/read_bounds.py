"""What a read would cost, found out before it is made, so that no answer grows past the settings' bounds
(`GRADWATCH_MAX_RESPONSE_VALUES`, `GRADWATCH_MAX_RESPONSE_BYTES`; limits.py raises the 422).

A raw read of steps costs every value of the rows it reads (a row holds all of a run's layers, whichever are
asked for), so the cost is rows × values a row. The rows are counted with an index probe that stops one row past
what the limit allows: the count costs at most the limit's worth of index entries, never the run's length.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, literal, select

from .limits import InputLimits
from .storage.dialect import storage_dialect
from .storage.models import runs, steps

__all__ = ["check_raw_read", "check_documents", "fetch_in_parts", "rows_in_range"]

_PART_VALUES = 50_000
"""values a fetch converts at once in a large read (a few milliseconds): the driver turns a whole fetch into
Python objects in one call that holds the GIL, and /healthz would wait for a million values"""


def rows_in_range(conn: Connection, run_pk: int, start: int | None, end: int | None, at_most: int) -> int:
    """Stored steps of the run in start..end, counted up to `at_most`."""
    q = select(literal(1)).where(steps.c.run_pk == run_pk)
    if start is not None:
        q = q.where(steps.c.step >= start)
    if end is not None:
        q = q.where(steps.c.step <= end)
    inner = q.limit(at_most).subquery()
    return int(conn.execute(select(func.count()).select_from(inner)).scalar_one())


def check_raw_read(conn: Connection, limits: InputLimits, run_pk: int, start: int | None, end: int | None,
                   values_per_row: int, max_rows: int, advice: str) -> None:
    """Refuse (LimitExceeded) a read of up to `max_rows` rows of `values_per_row` values each that would read
    more than max_response_values."""
    per_row = max(1, values_per_row)
    allowed_rows = limits.max_response_values // per_row
    if min(max_rows, allowed_rows + 1) <= allowed_rows:
        return  # even a full page stays within the limit: nothing to count
    n = rows_in_range(conn, run_pk, start, end, min(max_rows, allowed_rows + 1))
    if n > allowed_rows:  # counted no further than one row past the limit: "at least"
        limits.check_response_values(["query"], n * per_row, advice, at_least=True)


def fetch_in_parts(max_rows: int, values_per_row: int) -> dict[str, Any]:
    """Execution options for a read of up to `max_rows` rows: none when it is small (the common case, one
    fetch), else rows fetched a few at a time (a server-side cursor on PostgreSQL)."""
    if max_rows * max(1, values_per_row) <= 4 * _PART_VALUES:
        return {}
    return {"yield_per": max(1, _PART_VALUES // max(1, values_per_row))}


def check_documents(conn: Connection, limits: InputLimits, page: Any, advice: str) -> None:
    """Refuse a list page whose runs' config and meta add up to more than max_response_bytes. `page` is a
    select of runs.c.id (the page's rows)."""
    ids = page.subquery()
    dialect = storage_dialect(conn)
    q = select(func.coalesce(func.sum(dialect.json_size(runs.c.config) + dialect.json_size(runs.c.meta)), 0)) \
        .where(runs.c.id.in_(select(ids.c.id)))
    limits.check_response_bytes(["query", "limit"], int(conn.execute(q).scalar_one()), advice)
