"""Webhook signatures per the Standard Webhooks specification (standardwebhooks.com).

Receivers verify `webhook-signature` with any Standard Webhooks library, or in ten lines of stdlib
(docs/alerting.md): `v1,` + base64 HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the
base64-decoded part of the `whsec_` secret. The timestamp is signed too, so a captured request cannot be
replayed later than the receiver's tolerance (five minutes by convention).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

__all__ = ["SECRET_PREFIX", "new_secret", "sign", "signed_headers", "verify"]

SECRET_PREFIX = "whsec_"
TOLERANCE_S = 300


def new_secret() -> str:
    """32 random bytes, as the spec's `whsec_` + base64 form."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(secret, msg_id, ts, body)}


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """What a receiver does: a fresh timestamp and one matching `v1` signature (several may be listed while a
    secret rotates)."""
    try:
        msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > TOLERANCE_S:
        return False
    expected = sign(secret, msg_id, ts, body)
    return any(hmac.compare_digest(expected, s) for s in headers.get("webhook-signature", "").split())
