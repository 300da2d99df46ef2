"""Webhook subscriptions and their delivery log: the storage behind /v1/webhooks."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, and_, delete, func, insert, select, update

from ..storage.db import now_utc
from ..storage.dialect import aware_utc, storage_dialect
from ..storage.models import webhook_attempts, webhook_deliveries, webhook_subscriptions
from .schemas import (
    AttemptPublic,
    DeliveryPublic,
    SubscriptionCreate,
    SubscriptionCreated,
    SubscriptionPublic,
    SubscriptionUpdate,
)
from .signing import new_secret

__all__ = ["count_subscriptions", "create_subscription", "delete_subscription", "get_delivery", "get_subscription",
           "list_deliveries", "list_subscriptions", "resend_delivery", "rotate_secret", "update_subscription"]

_S = webhook_subscriptions
_PUBLIC = (_S.c.id, _S.c.name, _S.c.url, _S.c.project, _S.c.min_severity, _S.c.enabled, _S.c.created_at,
           _S.c.updated_at)


def _utc_or_none(t: datetime | None) -> datetime | None:
    return None if t is None else aware_utc(t)


def _public(row: Any) -> SubscriptionPublic:
    return SubscriptionPublic(id=row.id, name=row.name, url=row.url, project=row.project,
                              min_severity=row.min_severity, enabled=row.enabled, created_at=aware_utc(row.created_at),
                              updated_at=aware_utc(row.updated_at))


def create_subscription(conn: Connection, body: SubscriptionCreate) -> SubscriptionCreated:
    now, secret = now_utc(), new_secret()
    name = body.name or urlsplit(body.url).hostname or "webhook"
    sub_id = conn.execute(insert(_S).values(
        name=name, url=body.url, project=body.project, min_severity=body.min_severity, enabled=body.enabled,
        secret=secret, created_at=now, updated_at=now).returning(_S.c.id)).scalar_one()
    sub = get_subscription(conn, int(sub_id))
    assert sub is not None
    return SubscriptionCreated(**sub.model_dump(), secret=secret)


def count_subscriptions(conn: Connection) -> int:
    """How many are stored, for the limit on their number. On PostgreSQL it first takes a transaction-scoped
    lock that every creating transaction takes, so two creations at once cannot both pass the limit (SQLite's
    writers are serialised already)."""
    storage_dialect(conn).serialize(conn, 7234550193)  # any constant: "creating a subscription"
    return int(conn.execute(select(func.count()).select_from(_S)).scalar_one())


def list_subscriptions(conn: Connection) -> list[SubscriptionPublic]:
    return [_public(r) for r in conn.execute(select(*_PUBLIC).order_by(_S.c.id))]


def get_subscription(conn: Connection, sub_id: int) -> SubscriptionPublic | None:
    row = conn.execute(select(*_PUBLIC).where(_S.c.id == sub_id)).first()
    return None if row is None else _public(row)


def update_subscription(conn: Connection, sub_id: int, body: SubscriptionUpdate) -> SubscriptionPublic | None:
    changes = body.model_dump(exclude_unset=True)
    for required in ("url", "name", "min_severity", "enabled"):  # only `project` may be set back to null
        if changes.get(required, "") is None:
            del changes[required]
    if changes:
        conn.execute(update(_S).where(_S.c.id == sub_id).values(**changes, updated_at=now_utc()))
    return get_subscription(conn, sub_id)


def delete_subscription(conn: Connection, sub_id: int) -> bool:
    """Its pending deliveries and log go with it."""
    conn.execute(delete(webhook_attempts).where(webhook_attempts.c.delivery_id.in_(
        select(webhook_deliveries.c.id).where(webhook_deliveries.c.subscription_id == sub_id))))
    conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.subscription_id == sub_id))
    return conn.execute(delete(_S).where(_S.c.id == sub_id)).rowcount > 0


def rotate_secret(conn: Connection, sub_id: int) -> str | None:
    secret = new_secret()
    done = conn.execute(update(_S).where(_S.c.id == sub_id).values(secret=secret, updated_at=now_utc()))
    return secret if done.rowcount else None


def list_deliveries(conn: Connection, sub_id: int, *, state: str | None = None, limit: int = 100,
                    offset: int = 0) -> tuple[list[DeliveryPublic], int]:
    """Newest first, each with its attempts."""
    d = webhook_deliveries
    cond = [d.c.subscription_id == sub_id] + ([d.c.state == state] if state else [])
    rows = conn.execute(select(d).where(*cond).order_by(d.c.id.desc()).limit(limit).offset(offset)).all()
    count = int(conn.execute(select(func.count()).select_from(d).where(*cond)).scalar_one())
    return _with_attempts(conn, rows), count


def get_delivery(conn: Connection, sub_id: int, delivery_id: int) -> DeliveryPublic | None:
    d = webhook_deliveries
    rows = conn.execute(select(d).where(d.c.id == delivery_id, d.c.subscription_id == sub_id)).all()
    return _with_attempts(conn, rows)[0] if rows else None


def _with_attempts(conn: Connection, rows: Sequence[Any]) -> list[DeliveryPublic]:
    attempts: dict[int, list[AttemptPublic]] = {r.id: [] for r in rows}
    if rows:
        a = webhook_attempts
        for r in conn.execute(select(a).where(a.c.delivery_id.in_(list(attempts))).order_by(a.c.delivery_id,
                                                                                             a.c.attempt)):
            attempts[r.delivery_id].append(AttemptPublic(attempt=r.attempt, outcome=r.outcome,
                                                         status_code=r.status_code, latency_ms=r.latency_ms,
                                                         error=r.error, at=aware_utc(r.at)))
    return [DeliveryPublic(id=r.id, msg_id=r.msg_id, event=r.event, incident=r.incident, state=r.state,
                           attempts=attempts[r.id],
                           next_attempt_at=_utc_or_none(r.next_attempt_at) if r.state == "pending" else None,
                           last_status_code=r.last_status_code, last_error=r.last_error,
                           created_at=aware_utc(r.created_at), delivered_at=_utc_or_none(r.delivered_at)) for r in rows]


def resend_delivery(conn: Connection, sub_id: int, delivery_id: int) -> str | None:
    """Make a dead (or delivered) delivery due now, with a fresh retry window and the same `webhook-id`.
    Returns its state before, or None when there is no such delivery; a pending one is left as it is."""
    d = webhook_deliveries
    where = and_(d.c.id == delivery_id, d.c.subscription_id == sub_id)
    state = conn.execute(select(d.c.state).where(where).with_for_update()).scalar()
    if state is None or state == "pending":
        return state
    now = now_utc()
    conn.execute(update(d).where(where).values(state="pending", next_attempt_at=now, retry_from=now, updated_at=now,
                                               delivered_at=None))
    return str(state)
