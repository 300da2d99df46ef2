"""Retention: old runs with everything they own, and settled webhook deliveries, deleted (`gradwatch db prune`).

A run is deleted with one `DELETE` of its row: its steps, incidents and anything else keyed by the run go with it
through the foreign keys' `ON DELETE CASCADE` (SQLite enforces them because db.py turns `foreign_keys` on), so a
table added later is pruned without this module knowing it. Each run is its own write transaction, which keeps
the time other writers wait short on SQLite and lets a prune that is stopped halfway be run again.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Engine, and_, delete, func, select

from .db import read_connection, write_transaction
from .models import incidents, runs, webhook_deliveries

__all__ = ["DEFAULT_STATUSES", "SETTLED_DELIVERY_STATES", "PruneResult", "prune"]

DEFAULT_STATUSES = ("finished", "failed")
"""Runs that ended on their own. A `running` run that stopped reporting is left alone unless asked for."""
SETTLED_DELIVERY_STATES = ("delivered", "dead")
"""Webhook deliveries that will not be sent again on their own; pending ones are never pruned."""
_DELIVERY_CHUNK = 1000


@dataclass(frozen=True)
class PruneResult:
    """What a prune deleted, or would delete with `dry_run`."""

    runs: int
    steps: int
    incidents: int
    deliveries: int


def _old_runs(before: datetime, statuses: Collection[str]) -> ColumnElement[bool]:
    return and_(runs.c.updated_at < before, runs.c.status.in_(list(statuses)))


def _settled_deliveries(before: datetime) -> ColumnElement[bool]:
    return and_(webhook_deliveries.c.updated_at < before,
                webhook_deliveries.c.state.in_(SETTLED_DELIVERY_STATES))


def prune(engine: Engine, *, before: datetime, statuses: Collection[str] = DEFAULT_STATUSES,
          dry_run: bool = False) -> PruneResult:
    """Delete runs last updated before `before` whose status is one of `statuses` (steps, incidents and the rest
    by cascade), and webhook deliveries settled before `before` (their attempt log by cascade). `before` is an
    aware UTC datetime. A run updated since it was selected is kept."""
    if not statuses:
        raise ValueError("no run status given: nothing would be pruned")
    with read_connection(engine) as conn:
        candidates = conn.execute(select(runs.c.id).where(_old_runs(before, statuses)).order_by(runs.c.id)).all()
        if dry_run:
            n_steps = conn.execute(select(func.coalesce(func.sum(runs.c.n_steps), 0))
                                   .where(_old_runs(before, statuses))).scalar_one()
            n_incidents = conn.execute(select(func.count()).select_from(incidents.join(runs))
                                       .where(_old_runs(before, statuses))).scalar_one()
            n_deliveries = conn.execute(select(func.count()).select_from(webhook_deliveries)
                                        .where(_settled_deliveries(before))).scalar_one()
            return PruneResult(len(candidates), int(n_steps), int(n_incidents), int(n_deliveries))
    deleted_runs = deleted_steps = deleted_incidents = 0
    for (run_pk,) in candidates:
        with write_transaction(engine) as conn:
            n_incidents = conn.execute(select(func.count()).select_from(incidents)
                                       .where(incidents.c.run_pk == run_pk)).scalar_one()
            gone = conn.execute(delete(runs).where(runs.c.id == run_pk, _old_runs(before, statuses))
                                .returning(runs.c.n_steps)).scalar_one_or_none()
            if gone is None:  # updated (resumed, renamed) since it was selected
                continue
        deleted_runs += 1
        deleted_steps += int(gone)
        deleted_incidents += int(n_incidents)
    return PruneResult(deleted_runs, deleted_steps, deleted_incidents, _prune_deliveries(engine, before))


def _prune_deliveries(engine: Engine, before: datetime) -> int:
    deleted = 0
    while True:
        with write_transaction(engine) as conn:
            chunk = select(webhook_deliveries.c.id).where(_settled_deliveries(before)) \
                .order_by(webhook_deliveries.c.id).limit(_DELIVERY_CHUNK)
            n = conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.id.in_(chunk))).rowcount
        deleted += n
        if n < _DELIVERY_CHUNK:
            return deleted
