"""Webhook signatures: what we send verifies with the reference `standardwebhooks` package, and nothing else does."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gradwatch_service.alerting.signing import new_secret, signed_headers, verify

BODY = b'{"version":"4","status":"firing","alerts":[]}'


def test_the_reference_library_verifies_our_signature() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    headers = signed_headers(secret, "msg_1", BODY)
    assert Webhook(secret).verify(BODY, headers) == {"version": "4", "status": "firing", "alerts": []}
    assert verify(secret, headers, BODY)


def test_a_wrong_secret_a_changed_body_or_an_old_timestamp_is_rejected() -> None:
    secret = new_secret()
    headers = signed_headers(secret, "msg_1", BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"firing", b"resolved"), headers)
    old = signed_headers(secret, "msg_1", BODY, timestamp=int(time.time()) - 600)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, old)
    assert not verify(secret, old, BODY)
    assert not verify(new_secret(), headers, BODY)


def test_the_reference_library_signs_what_we_verify() -> None:
    """Same algorithm both ways: the spec's own signer agrees with ours byte for byte."""
    secret = new_secret()
    ts = int(time.time())
    ours = signed_headers(secret, "msg_2", BODY, timestamp=ts)["webhook-signature"]
    assert Webhook(secret).sign("msg_2", datetime.fromtimestamp(ts, UTC), BODY.decode()) == ours
