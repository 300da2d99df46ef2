"""The webhook delivery worker: a daemon thread in every service process that drains the outbox (outbox.py).

It sleeps until a transaction of this process commits webhook rows (an in-process wake-up, so an alert leaves
within milliseconds of its batch's commit) or the poll interval passes (rows committed by other replicas, retries
coming due). Each POST runs on a daemon thread of its own with a wall-clock deadline, at most
`webhook_concurrency` at once and one per subscription, so a receiver that hangs or trickles holds one sender for
`webhook_timeout_s` at most, never ingest, never another receiver and never the process's exit.

Before each POST the URL's host is resolved and checked again (webhook_targets.py), and the POST connects to the
address that passed, with the name as Host and TLS server name: a name that now points inside (DNS rebinding)
makes the delivery dead at once with the reason in its log, and no answer that changes after the check is used.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine

from ..settings import Settings
from ..storage.db import write_transaction
from .alert_body import alert_body, encode_body
from .outbox import Claim, Outcome, claim_due, on_outbox_commit, settle
from .signing import signed_headers
from .webhook_targets import Resolver, TargetPolicy, TargetRefused, check_target, system_resolver

__all__ = ["DeliveryWorker", "post", "send"]

log = logging.getLogger("gradwatch.webhooks")

USER_AGENT = "gradwatch-webhooks/0.1"
_MAX_ERROR_CHARS = 500


def send(url: str, body: bytes, headers: dict[str, str], timeout_s: float, policy: TargetPolicy,
         resolve: Resolver = system_resolver) -> Outcome:
    """Check the target as it resolves now, then POST to the checked address; a refusal is a final outcome."""
    start = time.perf_counter()
    try:
        target = check_target(url, policy, resolve)
    except TargetRefused as exc:
        return Outcome(status_code=None, latency_ms=(time.perf_counter() - start) * 1000, final=True,
                       error=f"refused before connecting: {exc}"[:_MAX_ERROR_CHARS])
    except OSError as exc:  # does not resolve (now): an ordinary failed attempt, retried
        return Outcome(status_code=None, latency_ms=(time.perf_counter() - start) * 1000,
                       error=f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS])
    return post(url, body, headers, timeout_s, address=target.address)


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float, address: str | None = None) -> Outcome:
    """One POST with the standard library (no extra server dependency); redirects are not followed. With
    `address`, the connection goes there, whatever the name resolves to now; Host and TLS (server name and the
    certificate's check) still use the URL's name.

    `timeout_s` bounds the whole attempt, connect, send and read together (a socket timeout alone bounds each
    operation: a receiver answering a few bytes at a time would hold the sender for ever): when it passes, a
    timer shuts the socket down, which ends whatever call is blocked on it."""
    parts = urlsplit(url)
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    start = time.perf_counter()
    conn = conn_type(parts.hostname or "", parts.port, timeout=timeout_s)
    if address is not None:
        conn._create_connection = _pinned(address)  # type: ignore[attr-defined]  # used by connect() in 3.11+
    deadline = _Deadline(conn, timeout_s)
    try:
        conn.connect()
        deadline.check()  # it may have passed while connecting, before there was a socket to shut
        conn.request("POST", path, body=body, headers={
            "content-type": "application/json", "user-agent": USER_AGENT, **headers})
        resp = conn.getresponse()
        resp.read(64 * 1024)
        deadline.check()
        status, error = resp.status, None if 200 <= resp.status < 300 else f"HTTP {resp.status} {resp.reason}"
    except Exception as exc:  # noqa: BLE001 - refused, reset, timed out, a bad name: all are a failed attempt
        status, error = None, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
        if deadline.passed.is_set():
            error = f"TimeoutError: no complete answer within {timeout_s:g} s (GRADWATCH_WEBHOOK_TIMEOUT_S)"
    finally:
        deadline.cancel()
        conn.close()
    return Outcome(status_code=status, latency_ms=(time.perf_counter() - start) * 1000, error=error)


class _Deadline:
    """Shuts a connection's socket down `timeout_s` after it is made (a timer thread; cancelled when done)."""

    def __init__(self, conn: http.client.HTTPConnection, timeout_s: float) -> None:
        self.conn = conn
        self.passed = threading.Event()
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.passed.set()
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def check(self) -> None:
        if self.passed.is_set():
            raise TimeoutError("the attempt's deadline passed")

    def cancel(self) -> None:
        self._timer.cancel()


def _pinned(address: str) -> Any:
    """http.client's socket factory, made to connect to `address` on the port it is asked for."""

    def connect(where: tuple[str, int], timeout: Any = None, source_address: Any = None) -> socket.socket:
        return socket.create_connection((address, where[1]), timeout, source_address)

    return connect


class DeliveryWorker:
    def __init__(self, engine: Engine, settings: Settings, resolve: Resolver = system_resolver,
                 public_url: Callable[[], str] | None = None) -> None:
        self.engine, self.settings = engine, settings
        self.public_url = public_url or settings.public_url
        """the service's own URL for webhook bodies (serving.py: with the port requests arrive on)"""
        self.policy = settings.webhook_target_policy()
        self.resolve = resolve
        """how target names are resolved before each POST (a parameter, so tests can play DNS)"""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._busy: set[int] = set()  # subscriptions with a POST in flight from this process
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="gradwatch-outbox", daemon=True)
        self._unhook = on_outbox_commit(engine, self._wake.set)
        # A send takes at most the timeout (post's deadline); after that (and a margin) another worker may take it.
        self.lease_s = 2 * settings.webhook_timeout_s + 1

    def start(self) -> DeliveryWorker:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop claiming; POSTs in flight are abandoned and their rows come due again when the lease ends."""
        self._unhook()
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.webhook_poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._dispatch()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the worker; the poll retries
                log.exception("webhook outbox: claiming deliveries failed")
                self._stop.wait(self.settings.webhook_poll_s)

    def _dispatch(self) -> int:
        with self._lock:
            free = self.settings.webhook_concurrency - len(self._busy)
            busy = set(self._busy)
        if free <= 0:
            return 0
        with write_transaction(self.engine) as conn:
            claims = claim_due(conn, limit=free, lease_s=self.lease_s, busy=busy)
        for claim in claims:
            with self._lock:
                self._busy.add(claim.subscription_id)
            # A daemon thread per POST (at most `webhook_concurrency`): one hanging receiver cannot delay exit.
            threading.Thread(target=self._deliver, args=(claim,), name="gradwatch-webhook", daemon=True).start()
        return len(claims)

    def _deliver(self, claim: Claim) -> None:
        s = self.settings
        try:
            body = encode_body(alert_body(claim.event, claim.payload, claim.receiver, self.public_url()))
            outcome = send(claim.url, body, signed_headers(claim.secret, claim.msg_id, body), s.webhook_timeout_s,
                           self.policy, self.resolve)
            with write_transaction(self.engine) as conn:
                result = settle(conn, claim, outcome, retry_base_s=s.webhook_retry_base_s,
                                retry_max_delay_s=s.webhook_retry_max_delay_s, retry_for_s=s.webhook_retry_for_s)
            if result != "delivered":
                log.warning("webhook %s to %s attempt %d %s: %s", claim.msg_id, claim.url, claim.attempt, result,
                            outcome.error)
        except Exception:  # noqa: BLE001 - the lease brings the row back; keep the worker alive
            log.exception("webhook %s: delivery attempt failed unexpectedly", claim.msg_id)
        finally:
            with self._lock:
                self._busy.discard(claim.subscription_id)
            self._wake.set()  # this receiver may have more due
