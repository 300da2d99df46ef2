"""The wire shapes of /v1/webhooks: subscriptions (the secret only in the answers that create or rotate it) and
the delivery log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, StringConstraints

from .schemas import ProjectName, WireModel

__all__ = ["AttemptPublic", "DeliveriesPublic", "DeliveryPublic", "SecretPublic", "SubscriptionCreate",
           "SubscriptionCreated", "SubscriptionPublic", "SubscriptionUpdate", "SubscriptionsPublic"]

Severity = Literal["warning", "critical"]


def _parsable(url: str) -> str:
    """What the sender will do with it must work: a host, and a port that is a number."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError as exc:
        raise ValueError(f"not a usable URL: {exc}") from None
    if not parts.hostname:
        raise ValueError("the URL has no host")
    return url


TargetUrl = Annotated[
    str, StringConstraints(min_length=8, max_length=2048, pattern=r"^https?://[^\s/?#\x00-\x1f\x7f]+[^\s\x00-\x1f\x7f]*$"),
    AfterValidator(_parsable)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]


class SubscriptionCreate(WireModel):
    url: TargetUrl = Field(description="http(s) URL that receives the POSTs")
    name: Name | None = Field(default=None, description="the body's `receiver`; the URL's host when absent")
    project: ProjectName | None = Field(default=None, description="only this project's incidents; all when absent")
    min_severity: Severity = Field(default="warning", description="warning: every incident; critical: only those")
    enabled: bool = True


class SubscriptionUpdate(WireModel):
    """PATCH: only the fields given change; `project: null` removes the filter."""

    url: TargetUrl | None = None
    name: Name | None = None
    project: ProjectName | None = None
    min_severity: Severity | None = None
    enabled: bool | None = None


class SubscriptionPublic(WireModel):
    id: int
    name: str
    url: str
    project: str | None
    min_severity: Severity
    enabled: bool
    created_at: datetime
    updated_at: datetime


class SubscriptionCreated(SubscriptionPublic):
    secret: str = Field(description="whsec_...: verify `webhook-signature` with it; shown only now")


class SubscriptionsPublic(WireModel):
    subscriptions: list[SubscriptionPublic]


class SecretPublic(WireModel):
    secret: str = Field(description="the new whsec_ secret; the old one stops signing at once")


class AttemptPublic(WireModel):
    attempt: int
    outcome: Literal["delivered", "failed", "dead"]
    status_code: int | None
    latency_ms: float
    error: str | None
    at: datetime


class DeliveryPublic(WireModel):
    id: int
    msg_id: str = Field(description="the `webhook-id` header: the same on every attempt")
    event: Literal["firing", "resolved"]
    incident: str = Field(description="run_id#seq")
    state: Literal["pending", "delivered", "dead"]
    attempts: list[AttemptPublic]
    next_attempt_at: datetime | None = Field(description="when pending: the next try")
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveriesPublic(WireModel):
    deliveries: list[DeliveryPublic]
    count: int
