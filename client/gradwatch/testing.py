"""Test a training script's instrumentation with no server: an in-memory transport that behaves like the service.

    from gradwatch.testing import MemoryTransport

    transport = MemoryTransport()
    run = gradwatch.init(transport=transport, spool_dir=tmp_path)
    train(run)                                   # your loop, with watch(), a callback, run.log(...)
    run.finish()
    steps = transport.steps(run.run_id)          # what the service would have stored, in step order
    assert steps[-1]["loss"] < steps[0]["loss"] and "layer_grad_norms" in steps[0]

Like httpx's `MockTransport`: the run's sender thread, batching, spool and retries all run as they do against
the service; only the HTTP is replaced. The store behaves like the ingest API where a client can tell
(idempotent on run and step, 409 on a changed resend, 404 for a run never PUT). `down = True` plays an outage
(every request fails to connect: steps go to the spool), and `open_incident(...)` makes every later batch's
answer carry an incident, to test what a script does on an alert (`on_alert`, `on_critical`, a callback's
stop). Standard library only.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._transport import Response, TransportError
from .wire import BINARY_CONTENT_TYPE, LAYER_FIELDS, decode_binary_batch, decode_value

if TYPE_CHECKING:
    from ._batch import StepBatch

__all__ = ["MemoryTransport", "Reply", "Response", "TransportError"]

Reply = tuple[int, Any, dict[str, str]]
"""A scripted answer: status, JSON body, headers."""


class MemoryTransport:
    """A `gradwatch.Transport` into an in-memory service. Thread-safe; one may serve several runs.

    `requests`: every request (method, path, headers, body as the service would parse it, `t`);
    `runs`: run id -> the run's body as PUT (project, name, config, status, meta);
    `script`: answers for the next step POSTs (None: answer normally); `hook(method, path, body)`: may answer any
    request instead of the store (None: the store answers)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.runs: dict[str, dict[str, Any]] = {}
        self.down = False
        self.incidents: list[dict[str, Any]] = []
        self.script: list[Reply | None] = []
        self.hook: Callable[[str, str, Any], Reply | None] | None = None
        self.lock = threading.Lock()
        self._steps: dict[str, dict[int, dict[str, Any]]] = {}

    # -- what a test reads -------------------------------------------------------------------------------
    def steps(self, run_id: str) -> list[dict[str, Any]]:
        """The run's stored steps in step order, as plain values: floats (NaN and ±inf as floats), per-layer
        norms as {layer: float} under `layer_grad_norms`, `layer_weight_norms`, `layer_update_norms`."""
        with self.lock:
            stored = sorted(self._steps.get(run_id, {}).items())
        out = []
        for _, step in stored:
            plain: dict[str, Any] = {}
            for key, value in step.items():
                if key in LAYER_FIELDS:
                    plain[key] = {name: decode_value(v) for name, v in value.items() if v is not None}
                elif key == "scalars":
                    plain[key] = {name: decode_value(v) for name, v in value.items()}
                elif key in ("step", "skipped"):
                    plain[key] = value
                else:
                    plain[key] = decode_value(value)
            out.append(plain)
        return out

    def stored(self, run_id: str) -> dict[int, dict[str, Any]]:
        """The run's stored steps by number, values as on the JSON wire (non-finite ones as "NaN", ...)."""
        with self.lock:
            return dict(self._steps.get(run_id, {}))

    def posts(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["method"] == "POST"]

    def open_incident(self, signature: str = "grad_growth", severity: str = "critical", step: int = 0,
                      layer: str | None = None) -> dict[str, Any]:
        """Have every later batch's answer carry this open incident, as the service's answers do."""
        incident = {"id": len(self.incidents) + 1, "signature": signature, "severity": severity,
                    "opened_step": step, "status": "open", "root_cause_layer": layer}
        with self.lock:
            self.incidents.append(incident)
        return incident

    # -- the Transport protocol --------------------------------------------------------------------------
    def request(self, method: str, path: str, payload: Any = None) -> Response:
        return self._reply(method, path, {"Content-Type": "application/json"}, payload)

    def post_steps(self, path: str, batch: StepBatch) -> Response:
        """Through the batch's binary form, as over HTTP (a batch the binary form cannot carry goes as JSON)."""
        try:
            body = decode_binary_batch(batch.binary())
        except (ValueError, TypeError, OverflowError):
            body = json.loads(json.dumps(batch.body()))
        return self._reply("POST", path, {"Content-Type": BINARY_CONTENT_TYPE}, body)

    def close(self) -> None:
        pass

    # -- the service -------------------------------------------------------------------------------------
    def respond(self, method: str, path: str, headers: dict[str, str], body: Any) -> Reply:
        """What the service answers to a request (a test's HTTP server may serve this too)."""
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
                self._steps.setdefault(run_id, {})
                return (201 if created else 200), {"run_id": run_id, **self.runs[run_id]}, {}
            if self.script:
                scripted = self.script.pop(0)
                if scripted is not None:
                    return scripted
            if run_id not in self.runs:
                return 404, {"detail": "unknown run"}, {}
            stored = self._steps[run_id]
            layers = body.get("layers") or []
            incoming = {s["step"]: _comparable(s, layers) for s in body["steps"]}
            conflicts = [n for n, s in incoming.items() if n in stored and stored[n] != s]
            if conflicts:
                return 409, {"detail": {"message": "conflict", "steps": conflicts}}, {}
            duplicates = sum(1 for n in incoming if n in stored)
            stored.update(incoming)
            return 200, {"run_id": run_id, "accepted": len(incoming) - duplicates, "duplicates": duplicates,
                         "last_step": max(stored), "open_incidents": list(self.incidents)}, {}

    def _reply(self, method: str, path: str, headers: dict[str, str], body: Any) -> Response:
        if self.down:
            raise TransportError(f"{method} {path}: connection refused")
        status, reply, reply_headers = self.respond(method, path, headers, body)
        return Response(status, json.loads(json.dumps(reply)), {k.lower(): v for k, v in reply_headers.items()})


def _comparable(step: dict[str, Any], layers: list[str]) -> dict[str, Any]:
    """A step with its per-layer arrays keyed by layer name and without `time`, as the service compares."""
    out = {k: v for k, v in step.items() if k != "time"}
    for key in LAYER_FIELDS:
        if key in out:
            out[key] = dict(zip(layers, out[key], strict=True))
    return out
