"""A webhook receiver on a loopback port that records every request; what it answers is up to the test."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Received", "Receiver"]


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.perf_counter)
    status: int = 0

    @property
    def msg_id(self) -> str:
        return self.headers["webhook-id"]

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class Receiver:
    """`answer(request, n)` (n: 1-based count of requests so far) returns the status, or sleeps to hang."""

    def __init__(self, answer: Callable[[Received, int], int] | None = None) -> None:
        self.answer = answer or (lambda _r, _n: 200)
        self.received: list[Received] = []
        self.arrived = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                req = Received({k.lower(): v for k, v in self.headers.items()}, body)
                with owner.arrived:
                    owner.received.append(req)
                    n = len(owner.received)
                    owner.arrived.notify_all()
                status = owner.answer(req, n)
                with owner.arrived:
                    req.status = status
                    owner.arrived.notify_all()
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def accepted(self) -> list[Received]:
        return [r for r in self.received if 200 <= r.status < 300]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 20.0) -> list[Received]:
        """Wait until `predicate(received)` holds; returns the requests, or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            with self.arrived:
                if predicate(self.received):
                    return list(self.received)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"receiver: condition not met after {timeout}s; got {len(self.received)}")
                self.arrived.wait(min(left, 0.05))

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
