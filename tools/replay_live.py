"""Replay traces through a live gradwatch server (real ingest, batch by batch) and check its incidents are the
pages `gradwatch replay` computes offline for the same traces.

    .venv/bin/gradwatch serve --port 8765 &                 # or any running server (GRADWATCH_TOKEN if it has tokens)
    .venv/bin/python tools/replay_live.py ../shared/traces/real-dev --url http://127.0.0.1:8765

Each trace becomes a new run (its run id plus a random suffix) in project `replay-live`; its steps are posted in
batches of --batch, as a training job's client would. Then the run's incidents are read back and turned into
pages — the opening (step, severity, signature) of each incident and, when it opened as a warning, its
escalation — and compared with replay's alert lines. Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
import uuid
from typing import Any

from gradwatch.detect import DetectorConfig, StepInput
from gradwatch.replay import read_trace, replay_run, trace_paths
from gradwatch.wire import encode_value

Page = tuple[int, str, str]


def _call(url: str, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read() or b"null")


def _wire_step(step: StepInput) -> dict[str, Any]:
    """A step as replay reads it (per-layer values as name -> value maps) in the ingest API's JSON form."""
    out: dict[str, Any] = {"step": step.step}
    for key in ("loss", "grad_norm", "lr", "update_norm"):
        if getattr(step, key) is not None:
            out[key] = encode_value(getattr(step, key))
    for key in ("layer_grad_norms", "layer_weight_norms", "layer_update_norms"):
        values = getattr(step, key)
        if values:
            out[key] = {k: encode_value(v) for k, v in values.items()}
    return out


def served_pages(incidents: list[dict[str, Any]]) -> list[Page]:
    """The pages an incident list stands for: each incident's opening and, if it opened as a warning, the
    step its timeline turned critical."""
    pages: list[Page] = []
    for inc in sorted(incidents, key=lambda i: i["seq"]):
        timeline = inc["evidence"]["timeline"]
        first = timeline[0]
        pages.append((inc["opened_step"], first["severity"], first["signature"]))
        if first["severity"] == "warning":
            pages += [(e["step"], "critical", e["signature"]) for e in timeline if e["severity"] == "critical"][:1]
    return pages


def replay_live(url: str, path: str, batch: int, token: str | None) -> tuple[str, list[Page], list[Page], float]:
    """(run id, replay's pages, the server's pages, seconds the ingest took) for one trace."""
    name, steps = read_trace(path)
    offline = [(a["step"], a["severity"], a["signature"]) for a in replay_run(name, steps, DetectorConfig())]
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"
    _call(url, "PUT", f"/v1/runs/{run_id}", {"project": "replay-live"}, token)
    started = time.perf_counter()
    for i in range(0, len(steps), batch):
        _call(url, "POST", f"/v1/runs/{run_id}/steps", {"steps": [_wire_step(s) for s in steps[i:i + batch]]}, token)
    took = time.perf_counter() - started
    listed = _call(url, "GET", f"/v1/runs/{run_id}/incidents?limit=1000", None, token)["incidents"]
    return run_id, offline, served_pages(listed), took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("traces", help="a trace file or a directory of *.jsonl / *.jsonl.gz")
    parser.add_argument("--url", default=os.environ.get("GRADWATCH_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("GRADWATCH_TOKEN"))
    parser.add_argument("--batch", type=int, default=500, help="steps per ingest request (default 500)")
    args = parser.parse_args()
    differ = 0
    for path in trace_paths(args.traces):
        run_id, offline, served, took = replay_live(args.url.rstrip("/"), path, args.batch, args.token)
        same = offline == served
        differ += not same
        print(f"{run_id:<56} {len(offline):>4} pages offline {len(served):>4} served  "
              f"{'same' if same else 'DIFFERENT'}  (ingest {took:.1f} s)")
        if not same:
            print(f"  offline: {offline}\n  served:  {served}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
