"""HTTP to the service over one keep-alive connection, stdlib only.

One `http.client` connection is reused for every request (a TLS or TCP handshake per batch would cost more
than the batch). A connection the server closed while idle is reopened once transparently; every request
the client makes is idempotent, so that retry is always safe.

Step batches go as binary columns (`gradwatch.wire.encode_binary_batch`, not gzipped: float64 columns are
already smaller than gzipped JSON, and gzip would only cost both ends CPU); a service that answers 415 to them
(one older than the binary wire) gets JSON from then on.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .wire import BINARY_CONTENT_TYPE, USER_AGENT

if TYPE_CHECKING:
    import http.client

    from ._batch import StepBatch

__all__ = ["HttpTransport", "Response", "Transport", "TransportError", "parse_retry_after"]



class TransportError(Exception):
    """The request did not get an HTTP response: refused, reset, timed out, name not resolved."""


@dataclass
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Transport(Protocol):
    """What the sender needs of the way to the service. Raises `TransportError` when no response came."""

    def request(self, method: str, path: str, payload: Any = None) -> Response:
        """A JSON request (a run's PUT)."""

    def post_steps(self, path: str, batch: StepBatch) -> Response:
        """A step batch, in whatever form the service takes."""

    def close(self) -> None:
        """Let go of any connection."""


class HttpTransport:
    """Sends JSON (gzipped when `compress`) or, for step batches with `binary`, binary columns, and returns the
    parsed JSON response. Not thread-safe: the sender thread owns it (and `gradwatch sync`, which runs in one
    thread)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0, compress: bool = True,
                 binary: bool = True):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"gradwatch URL must be http(s)://host[:port][/prefix], got {url!r}")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._compress = compress
        self.binary = binary
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, payload: Any = None) -> Response:
        return self._request(method, path, payload)

    def post_steps(self, path: str, batch: StepBatch) -> Response:
        """Binary where the service takes it, else JSON."""
        if self.binary:
            try:
                encoded = batch.binary()
            except (ValueError, TypeError, OverflowError):
                encoded = None  # not numbers, or a step past int64: JSON carries it and the service says why
            if encoded is not None:
                response = self._request("POST", path, None, binary=encoded)
                if response.status != 415:
                    return response
                self.binary = False  # an older service: JSON from now on
        return self._request("POST", path, batch.body())

    def _request(self, method: str, path: str, payload: Any, binary: bytes | None = None) -> Response:
        import gzip
        import http.client  # here, not at import time: `import gradwatch` stays cheap

        body = None
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT, "Connection": "keep-alive"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if binary is not None:
            body = binary
            headers["Content-Type"] = BINARY_CONTENT_TYPE
        elif payload is not None:
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
            if self._compress:
                body = gzip.compress(body, compresslevel=5)
                headers["Content-Encoding"] = "gzip"
        reused = self._conn is not None
        try:
            return self._send(method, self._prefix + path, body, headers)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            self.close()
            if not reused:
                raise TransportError(f"{method} {path}: {exc!r}") from exc
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransportError(f"{method} {path}: {exc!r}") from exc
        # The server dropped the idle keep-alive connection; one fresh attempt.
        try:
            return self._send(method, self._prefix + path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransportError(f"{method} {path}: {exc!r}") from exc

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Response:
        conn = self._connection()
        conn.request(method, path, body=body, headers=headers)
        raw = conn.getresponse()
        data = raw.read()
        response_headers = {k.lower(): v for k, v in raw.getheaders()}
        if raw.will_close:
            self.close()
        parsed: Any = None
        if data:
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = {"detail": data[:500].decode("utf-8", "replace")}
        return Response(raw.status, parsed, response_headers)

    def _connection(self) -> http.client.HTTPConnection:
        import http.client
        import socket

        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self._timeout)
            self._conn.connect()
            if self._conn.sock is not None:
                self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
