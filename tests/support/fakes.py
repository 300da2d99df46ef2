"""Stand-ins for the service in client tests: a fake service, reached over a recording HTTP server or an
in-memory transport, and a socket that never answers.

The fake behaves like the real ingest API where the client can tell (idempotent on run and step, 409 on a
changed resend, 404 for an unknown run) and lets a test script failures. Sender tests that are not about
sockets use `MemoryTransport`; tests that need the real thing use the `live_server` fixture.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gradwatch._batch import StepBatch
from gradwatch._transport import Response, TransportError
from gradwatch.wire import BINARY_CONTENT_TYPE

from .binary import decode_binary_batch

__all__ = ["FakeService", "HungServer", "MemoryTransport", "Recorder", "closed_port"]

Reply = tuple[int, Any, dict[str, str]]


class FakeService:
    """Records every request and stores steps like the service does."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.runs: dict[str, dict[str, Any]] = {}
        self.steps: dict[str, dict[int, dict[str, Any]]] = {}
        self.script: list[Reply | None] = []  # replies for the next POSTs (None: behave normally)
        self.incidents: list[dict[str, Any]] = []
        self.hook: Callable[[str, str, Any], Reply | None] | None = None
        self.lock = threading.Lock()

    def respond(self, method: str, path: str, headers: dict[str, str], body: Any) -> Reply:
        with self.lock:
            self.requests.append({"method": method, "path": path, "headers": headers, "body": body,
                                  "t": time.monotonic()})
            if self.hook is not None:
                reply = self.hook(method, path, body)
                if reply is not None:
                    return reply
            parts = path.strip("/").split("/")  # v1 runs <id> [steps]
            run_id = parts[2]
            if method == "PUT":
                created = run_id not in self.runs
                self.runs.setdefault(run_id, {}).update(body)
                self.steps.setdefault(run_id, {})
                return (201 if created else 200), {"run_id": run_id, **self.runs[run_id]}, {}
            if self.script:
                scripted = self.script.pop(0)
                if scripted is not None:
                    return scripted
            if run_id not in self.runs:
                return 404, {"detail": "unknown run"}, {}
            stored = self.steps[run_id]
            layers = body.get("layers") or []
            incoming = {s["step"]: _comparable(s, layers) for s in body["steps"]}
            conflicts = [n for n, s in incoming.items() if n in stored and stored[n] != s]
            if conflicts:
                return 409, {"detail": {"message": "conflict", "steps": conflicts}}, {}
            duplicates = sum(1 for n in incoming if n in stored)
            stored.update(incoming)
            return 200, {"run_id": run_id, "accepted": len(incoming) - duplicates, "duplicates": duplicates,
                         "last_step": max(stored), "open_incidents": list(self.incidents)}, {}

    def posts(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["method"] == "POST"]

    def stored(self, run_id: str) -> dict[int, dict[str, Any]]:
        with self.lock:
            return dict(self.steps.get(run_id, {}))


class MemoryTransport:
    """The sender's transport (`gradwatch._transport.Transport`) straight into a fake service, no sockets.
    Step batches go through their binary form, as over HTTP. `down`: every request fails to connect."""

    def __init__(self, service: FakeService) -> None:
        self.service = service
        self.down = False

    def request(self, method: str, path: str, payload: Any = None) -> Response:
        return self._reply(method, path, {"Content-Type": "application/json"}, payload)

    def post_steps(self, path: str, batch: StepBatch) -> Response:
        body = decode_binary_batch(batch.binary())
        return self._reply("POST", path, {"Content-Type": BINARY_CONTENT_TYPE}, body)

    def close(self) -> None:
        pass

    def _reply(self, method: str, path: str, headers: dict[str, str], body: Any) -> Response:
        if self.down:
            raise TransportError(f"{method} {path}: connection refused")
        status, reply, reply_headers = self.service.respond(method, path, headers, body)
        return Response(status, json.loads(json.dumps(reply)), {k.lower(): v for k, v in reply_headers.items()})


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

def _comparable(step: dict[str, Any], layers: list[str]) -> dict[str, Any]:
    """A step with its per-layer arrays keyed by layer name and without `time`, as the service compares."""
    out = {k: v for k, v in step.items() if k != "time"}
    for key in ("layer_grad_norms", "layer_weight_norms", "layer_update_norms"):
        if key in out:
            out[key] = dict(zip(layers, out[key], strict=True))
    return out


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
