"""The wire shapes of /v1/webhooks: subscriptions (the secret only in the answers that create or rotate it) and
the delivery log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, ConfigDict, Field, StringConstraints

from ..schemas import ProjectName, WireModel

__all__ = ["CREATE_EXAMPLE", "UPDATE_EXAMPLE", "AttemptPublic", "DeliveriesPublic", "DeliveryPublic",
           "SecretPublic", "SubscriptionCreate", "SubscriptionCreated", "SubscriptionPublic", "SubscriptionUpdate",
           "SubscriptionsPublic"]

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
    str, StringConstraints(min_length=8, pattern=r"^https?://[^\s/?#\x00-\x1f\x7f]+[^\s\x00-\x1f\x7f]*$"),
    AfterValidator(_parsable)]
_SUB = {"id": 1, "name": "oncall", "url": "https://hooks.example.com/gradwatch", "project": "vision",
        "min_severity": "critical", "enabled": True, "created_at": "2026-12-02T04:40:00Z",
        "updated_at": "2026-12-02T04:40:00Z"}
_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwGbqnH6mR3Hs="
_DELIVERY = {"id": 7, "msg_id": "msg_4f1c0e3a9b2d4c7e8f6a5b4c3d2e1f00", "event": "firing",
             "incident": "resnet50-7f3a#1", "state": "delivered", "next_attempt_at": None, "last_status_code": 204,
             "last_error": None,
             "created_at": "2026-12-02T04:40:02Z", "delivered_at": "2026-12-02T04:40:08Z",
             "attempts": [{"attempt": 1, "outcome": "failed", "status_code": 503, "latency_ms": 3.2,
                           "error": "HTTP 503 Service Unavailable", "at": "2026-12-02T04:40:02Z"},
                          {"attempt": 2, "outcome": "delivered", "status_code": 204, "latency_ms": 2.9,
                           "error": None, "at": "2026-12-02T04:40:08Z"}]}
CREATE_EXAMPLE = {"url": "https://hooks.example.com/gradwatch", "name": "oncall", "project": "vision",
                  "min_severity": "critical"}
UPDATE_EXAMPLE = {"project": None, "enabled": False}


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


Name = Annotated[str, StringConstraints(min_length=1, pattern=r"^[^\x00-\x1f\x7f]+$")]


class SubscriptionCreate(WireModel):
    url: TargetUrl = Field(description="http(s) URL that receives the POSTs")
    name: Name | None = Field(default=None, description="the body's `receiver`; the URL's host when absent")
    project: ProjectName | None = Field(default=None, description="only this project's incidents; all when absent")
    min_severity: Severity = Field(default="warning", description="warning: every incident; critical: only those")
    enabled: bool = True

    model_config = _examples(CREATE_EXAMPLE)


class SubscriptionUpdate(WireModel):
    """PATCH: only the fields given change; `project: null` removes the filter."""

    url: TargetUrl | None = None
    name: Name | None = None
    project: ProjectName | None = None
    min_severity: Severity | None = None
    enabled: bool | None = None

    model_config = _examples(UPDATE_EXAMPLE)


class SubscriptionPublic(WireModel):
    id: int
    name: str
    url: str
    project: str | None
    min_severity: Severity
    enabled: bool
    created_at: datetime
    updated_at: datetime

    model_config = _examples(_SUB)


class SubscriptionCreated(SubscriptionPublic):
    secret: str = Field(description="whsec_...: verify `webhook-signature` with it; shown only now")

    model_config = _examples({**_SUB, "secret": _SECRET})


class SubscriptionsPublic(WireModel):
    subscriptions: list[SubscriptionPublic]

    model_config = _examples({"subscriptions": [_SUB]})


class SecretPublic(WireModel):
    secret: str = Field(description="the new whsec_ secret; the old one stops signing at once")

    model_config = _examples({"secret": _SECRET})


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

    model_config = _examples(_DELIVERY)


class DeliveriesPublic(WireModel):
    deliveries: list[DeliveryPublic]
    count: int

    model_config = _examples({"deliveries": [_DELIVERY], "count": 1})
