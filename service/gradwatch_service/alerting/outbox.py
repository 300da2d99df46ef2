"""The webhook outbox: notification rows written in the incident's own transaction, claimed and settled by the
delivery worker (delivery.py).

One row per (event, matching subscription), inserted by `enqueue_incident_event` inside the ingest transaction:
the notification commits exactly when the incident change does (decision 3), and each receiver then has its own
retry schedule, log and dead letter, so a receiver that is down or hangs never delays another. The fan-out
costs one small select and an insert per subscription, only when an incident opens, escalates or resolves.

A worker claims due rows in a short write transaction (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas
share the work; SQLite writers queue on the write lock) and moves `next_attempt_at` to the end of a lease: no
other worker takes the row while it is being sent, and if the sender dies, the row is due again when the lease
ends (at-least-once; receivers de-duplicate on `webhook-id`). The POST happens outside any transaction.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, event, func, insert, or_, select, update

from ..queries import list_incidents
from ..storage.db import now_utc
from ..storage.dialect import aware_utc, storage_dialect
from ..storage.models import webhook_attempts, webhook_deliveries, webhook_subscriptions

__all__ = ["Claim", "Outcome", "backoff_s", "claim_due", "delivery_counts", "enqueue_incident_event",
           "on_outbox_commit", "outbox_depth", "settle"]

_PENDING_KEY = "gradwatch_outbox_pending"
_COMMITTED_KEY = "gradwatch_outbox_committed"
_SEVERITY_RANK = {"warning": 0, "critical": 1}


def enqueue_incident_event(conn: Connection, run_pk: int, seq: int) -> int:
    """Queue the webhook for incident `seq` of run `run_pk` as it is now (open: `firing`, resolved: `resolved`) to
    every enabled subscription whose project and minimum severity match. Call it in the transaction that changed
    the incident, after the change. Returns the number of rows queued."""
    found, _ = list_incidents(conn, run_pk=run_pk, seqs=[seq], limit=1)
    if not found:
        return 0
    incident = found[0]
    subs = conn.execute(select(webhook_subscriptions.c.id, webhook_subscriptions.c.min_severity).where(
        webhook_subscriptions.c.enabled.is_(True),
        or_(webhook_subscriptions.c.project.is_(None), webhook_subscriptions.c.project == incident.project),
    )).all()
    rank = _SEVERITY_RANK[incident.severity]
    targets = [s.id for s in subs if _SEVERITY_RANK.get(s.min_severity, 0) <= rank]
    if not targets:
        return 0
    now = now_utc()
    payload = json.loads(incident.model_dump_json())  # non-finite values as their wire strings
    msg_id = f"msg_{uuid.uuid4().hex}"
    event_name = "firing" if incident.status == "open" else "resolved"
    conn.execute(insert(webhook_deliveries), [
        {"subscription_id": sub_id, "msg_id": msg_id, "event": event_name, "incident": incident.id,
         "payload": payload, "state": "pending", "attempts": 0, "next_attempt_at": now, "retry_from": now,
         "created_at": now, "updated_at": now}
        for sub_id in targets
    ])
    conn.info[_PENDING_KEY] = True
    return len(targets)


def on_outbox_commit(engine: Engine, callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` once a transaction that queued webhooks has committed and its connection is back in the
    pool (SQLAlchemy's `commit` event comes just before the database commits, too early for a reader to see the
    rows). This process only: other replicas find the rows by polling. Returns a function that removes the hook."""

    def committed(conn: Connection) -> None:
        if conn.info.pop(_PENDING_KEY, False):
            conn.info[_COMMITTED_KEY] = True

    def rolled_back(conn: Connection) -> None:
        conn.info.pop(_PENDING_KEY, None)

    def checked_in(_dbapi_conn: Any, record: Any) -> None:
        if record is not None and record.info.pop(_COMMITTED_KEY, False):
            callback()

    event.listen(engine, "commit", committed)
    event.listen(engine, "rollback", rolled_back)
    event.listen(engine.pool, "checkin", checked_in)

    def remove() -> None:
        event.remove(engine, "commit", committed)
        event.remove(engine, "rollback", rolled_back)
        event.remove(engine.pool, "checkin", checked_in)

    return remove


@dataclass(frozen=True)
class Claim:
    delivery_id: int
    subscription_id: int
    msg_id: str
    event: str
    payload: dict[str, Any]
    attempt: int
    retry_from: datetime
    url: str
    secret: str
    receiver: str


def claim_due(conn: Connection, *, limit: int, lease_s: float, busy: Collection[int] = ()) -> list[Claim]:
    """Take up to `limit` due deliveries, at most one per subscription and none for the `busy` subscriptions (one
    POST in flight per receiver, so a hanging receiver holds one sender, not all), and lease them."""
    now = now_utc()
    d, s = webhook_deliveries, webhook_subscriptions
    due = [d.c.state == "pending", d.c.next_attempt_at <= now]
    # Each subscription's oldest due row ...
    first = (select(d.c.id, func.row_number().over(partition_by=d.c.subscription_id,
                                                  order_by=(d.c.next_attempt_at, d.c.id)).label("n"))
             .where(*due))
    if busy:
        first = first.where(d.c.subscription_id.not_in(list(busy)))
    firsts = first.subquery()
    # ... locked, skipping rows another worker holds; the due test is repeated so PostgreSQL re-checks it on a
    # row that another worker claimed and committed meanwhile.
    q = (select(d.c.id, d.c.subscription_id, d.c.msg_id, d.c.event, d.c.payload, d.c.attempts, d.c.retry_from,
                s.c.url, s.c.secret, s.c.name)
         .join(s, s.c.id == d.c.subscription_id)
         .where(d.c.id.in_(select(firsts.c.id).where(firsts.c.n == 1)), *due, s.c.enabled.is_(True))
         .order_by(d.c.next_attempt_at, d.c.id).limit(limit)
         .with_for_update(of=d, skip_locked=True))
    # Losing this commit in a database crash only makes the row due again: no need to wait for the disk.
    storage_dialect(conn).lazy_commit(conn)
    chosen = {row.subscription_id: row for row in conn.execute(q)}
    if not chosen:
        return []
    ids = [r.id for r in chosen.values()]
    conn.execute(update(d).where(d.c.id.in_(ids)).values(
        attempts=d.c.attempts + 1, next_attempt_at=now + timedelta(seconds=lease_s), updated_at=now))
    return [Claim(delivery_id=r.id, subscription_id=r.subscription_id, msg_id=r.msg_id, event=r.event,
                  payload=r.payload, attempt=r.attempts + 1, retry_from=aware_utc(r.retry_from), url=r.url,
                  secret=r.secret, receiver=r.name) for r in chosen.values()]




def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Exponential (base · 2^(attempt-1), capped) with ±50 % jitter, so receivers coming back from an outage are
    not hit by every sender at the same instant."""
    nominal = min(max_s, base_s * 2.0 ** min(attempt - 1, 60))
    return nominal * (rng or random).uniform(0.5, 1.5)


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    latency_ms: float
    error: str | None
    final: bool = False
    """no retry can succeed (the target was refused): the delivery is dead at once"""

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def settle(conn: Connection, claim: Claim, outcome: Outcome, *, retry_base_s: float, retry_max_delay_s: float,
           retry_for_s: float) -> str:
    """Log the attempt and move the delivery on: delivered, due again after a backoff, or dead when the next try
    would fall past `retry_for_s` since `retry_from` or the outcome is final. Returns the attempt's outcome."""
    now = now_utc()
    d = webhook_deliveries
    if outcome.ok:
        result, values = "delivered", {"state": "delivered", "delivered_at": now}
    else:
        delay = backoff_s(claim.attempt, retry_base_s, retry_max_delay_s)
        if outcome.final or (now + timedelta(seconds=delay) - claim.retry_from).total_seconds() > retry_for_s:
            result, values = "dead", {"state": "dead"}
        else:
            result, values = "failed", {"next_attempt_at": now + timedelta(seconds=delay)}
    conn.execute(insert(webhook_attempts).values(
        delivery_id=claim.delivery_id, attempt=claim.attempt, outcome=result, status_code=outcome.status_code,
        latency_ms=outcome.latency_ms, error=outcome.error, at=now))
    # A success settles the row whoever holds it now (the receiver has it); anything else only while this claim
    # is the latest, so a sender whose lease ran out cannot reschedule what another worker now owns.
    mine = d.c.state == "pending" if outcome.ok else and_(d.c.state == "pending", d.c.attempts == claim.attempt)
    conn.execute(update(d).where(d.c.id == claim.delivery_id, mine)
                 .values(last_status_code=outcome.status_code, last_error=outcome.error, updated_at=now, **values))
    return result


def outbox_depth(conn: Connection) -> int:
    """Deliveries not yet delivered nor dead (the `gradwatch_webhook_outbox_depth` gauge)."""
    return int(conn.execute(select(func.count()).select_from(webhook_deliveries)
                            .where(webhook_deliveries.c.state == "pending")).scalar_one())


def delivery_counts(conn: Connection) -> dict[str, int]:
    """Attempts so far by outcome, `delivered`, `failed` and `dead`, read from the log so every replica reports
    the same (the `gradwatch_webhook_deliveries_total{outcome}` counter)."""
    rows = conn.execute(select(webhook_attempts.c.outcome, func.count()).group_by(webhook_attempts.c.outcome))
    counts = {"delivered": 0, "failed": 0, "dead": 0}
    counts.update({r[0]: int(r[1]) for r in rows})
    return counts
