"""`gradwatch import FILE`: a trace file (the labelled traces' format, JSON lines or CSV, as `gradwatch export`
writes it) becomes a run, sent through the ingest API in batches, so the service's detectors judge it as it
arrives, exactly as they would a live job; `--steps-per-second` paces it like one.

Batches have ids derived from the run and their first step, so importing the same file twice stores nothing
twice (the second time the steps are duplicates).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
import time
from typing import Any

from ._service import Service, ServiceError, add_connection_arguments, service_from_args
from .traces import batch_body, open_text, read_trace, run_body
from .wire import RUN_ID_PATTERN

__all__ = ["add_arguments", "import_trace", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a trace: *.jsonl, *.jsonl.gz or *.csv; - for standard input")
    parser.add_argument("--format", choices=("jsonl", "csv"), default=None,
                        help="the file's format (default: from its name; jsonl for standard input)")
    parser.add_argument("--run-id", default=None, help="the new run's id (default: the trace header's run_id)")
    parser.add_argument("--project", default=None, help="the run's project (default: the header's, or 'default')")
    parser.add_argument("--name", default=None, help="the run's name (default: the header's)")
    parser.add_argument("--batch-size", type=int, default=500, help="steps per request (default 500)")
    parser.add_argument("--steps-per-second", type=float, default=None,
                        help="pace the import like a live job (default: as fast as the service takes it)")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    fmt = args.format or ("csv" if args.file.removesuffix(".gz").endswith(".csv") else "jsonl")
    try:
        f = open_text(args.file, "r")
    except OSError as exc:
        print(f"gradwatch import: {exc}", file=sys.stderr)
        return 2
    try:
        header, lines = read_trace(f, fmt)
        run_id = args.run_id or (header or {}).get("run_id") or _name_of(args.file)
        if not run_id or not re.match(RUN_ID_PATTERN, run_id):
            print(f"gradwatch import: {run_id!r} is not a run id (letters, digits, . _ : -; --run-id)", file=sys.stderr)
            return 2
        with service_from_args(args) as service:
            outcome = import_trace(service, run_id, header, lines, project=args.project, name=args.name,
                                   batch_size=max(1, args.batch_size), steps_per_second=args.steps_per_second,
                                   progress=None if args.json else _progress)
    except (ValueError, ServiceError) as exc:
        print(f"gradwatch import: {exc}", file=sys.stderr)
        return 1
    finally:
        if f is not sys.stdin:
            f.close()
    if args.json:
        print(json.dumps(outcome, indent=2))
    else:
        print(f"{run_id}: {outcome['accepted']} steps stored, {outcome['duplicates']} already there; "
              f"status {outcome['status']}; {len(outcome['incidents'])} incident(s) opened")
        for i in sorted(outcome["incidents"], key=lambda i: (i["opened_step"], i["seq"])):
            layer = f" in {i['layer']}" if i.get("layer") else ""
            print(f"  step {i['opened_step']}: {i['severity']} {i['signature']}{layer}: {i['message']}")
        print(f"page: {service.url}/runs/{run_id}")
    return 0


def _name_of(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".gz", ".jsonl", ".csv"):
        name = name.removesuffix(suffix)
    return name


def _progress(incident: dict[str, Any]) -> None:
    layer = f" in {incident['layer']}" if incident.get("layer") else ""
    print(f"  incident at step {incident['opened_step']}: {incident['severity']} {incident['signature']}{layer}",
          flush=True)


def import_trace(service: Service, run_id: str, header: dict[str, Any] | None, lines: Any, *,
                 project: str | None = None, name: str | None = None, batch_size: int = 500,
                 steps_per_second: float | None = None, progress: Any = None) -> dict[str, Any]:
    """Make the run, send its steps batch by batch, then give it the header's status (finished when the trace
    does not say). Returns what was stored and the incidents the detectors opened on the way."""
    service.put(f"/v1/runs/{run_id}", run_body(header, project=project, name=name))
    accepted = duplicates = 0
    incidents: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    sent = 0
    iterator = iter(lines)
    while batch := list(itertools.islice(iterator, batch_size)):
        # paced: one step at a time, each when a live job would have logged it
        chunks = [batch[i: i + 1] for i in range(len(batch))] if steps_per_second else [batch]
        for chunk in chunks:
            if steps_per_second:
                wait = started + sent / steps_per_second - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            stored, repeated = _send(service, run_id, chunk, incidents, progress)
            accepted, duplicates, sent = accepted + stored, duplicates + repeated, sent + len(chunk)
    status = (header or {}).get("status") or "finished"
    service.put(f"/v1/runs/{run_id}", {"status": status})
    return {"run_id": run_id, "accepted": accepted, "duplicates": duplicates, "status": status,
            "incidents": list(incidents.values())}


def _send(service: Service, run_id: str, lines: list[dict[str, Any]], incidents: dict[str, dict[str, Any]],
          progress: Any) -> tuple[int, int]:
    """One batch; the incidents its answer raised go into `incidents`. Returns (stored, duplicates)."""
    batch_id = hashlib.sha256(f"{run_id}:{lines[0]['step']}:{len(lines)}".encode()).hexdigest()[:32]
    answer = service.post_steps(run_id, batch_body(lines, batch_id))
    for incident in sorted(answer.get("raised_incidents") or (), key=lambda i: (i["opened_step"], i["seq"])):
        if incident["id"] not in incidents and progress is not None:
            progress(incident)
        incidents[incident["id"]] = incident
    return int(answer.get("accepted", 0)), int(answer.get("duplicates", 0))
