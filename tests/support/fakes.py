"""Stand-ins for the service in client tests: a fake service, reached over a recording HTTP server or an
in-memory transport, and a socket that never answers.

The fake behaves like the real ingest API where the client can tell (idempotent on run and step, 409 on a
changed resend, 404 for an unknown run) and lets a test script failures. Sender tests that are not about
sockets use `MemoryTransport` (public: `gradwatch.testing`); tests that need the real thing use the
`live_server` fixture.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gradwatch.testing import MemoryTransport
from gradwatch.wire import BINARY_CONTENT_TYPE, decode_binary_batch

__all__ = ["FakeService", "HungServer", "MemoryTransport", "Recorder", "closed_port"]


class FakeService(MemoryTransport):
    """The in-memory service of `gradwatch.testing.MemoryTransport`, as the store behind a `Recorder`."""


class Recorder(FakeService):
    """The fake service behind a loopback HTTP server."""

    def __init__(self, port: int = 0) -> None:
        super().__init__()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                if self.headers.get("Content-Type") == BINARY_CONTENT_TYPE:
                    body = decode_binary_batch(raw)
                else:
                    body = json.loads(raw) if raw else None
                headers_in = {**dict(self.headers), "x-client-port": str(self.client_address[1])}
                status, reply, headers = recorder.respond(self.command, self.path, headers_in, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_PUT = do_POST = do_GET = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

def closed_port() -> int:
    """A loopback port nothing listens on (a Recorder's, closed again): connections to it are refused, and a
    Recorder may be started on it later to play the service coming back."""
    with Recorder() as probe:
        return probe.port


class HungServer:
    """A listening socket that accepts connections and never answers: the worst kind of outage."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        for conn in self.accepted:
            conn.close()
        self.sock.close()

    def __enter__(self) -> HungServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
