"""`gradwatch tail RUN`: follow a run live: its new steps as they are stored and its incidents as they open,
escalate and resolve, until the run is no longer running (or Ctrl-C)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ._format import fmt_value
from ._service import Service, ServiceError, add_connection_arguments, service_from_args
from .traces import step_line

__all__ = ["add_arguments", "run"]

PAGE_STEPS = 1000
"""Most steps one poll reads; a run ahead of the tail is caught up page by page."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN", help="the run's id")
    parser.add_argument("-n", "--lines", type=int, default=10, help="steps to show from before now (default 10)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    parser.add_argument("--forever", action="store_true",
                        help="keep following after the run stops running (default: stop then)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON lines: steps as trace step lines, incidents as {'kind': 'incident', ...}")
    add_connection_arguments(parser)


class _Tail:
    def __init__(self, service: Service, run_id: str, as_json: bool) -> None:
        self.service = service
        self.run_id = run_id
        self.as_json = as_json
        self.next_step = 0
        self.seen: dict[str, tuple[str, str, int]] = {}

    def emit(self, text: str) -> None:
        print(text, flush=True)

    def steps(self, layers: list[str]) -> int:
        """Print every step stored from `next_step` on; how many."""
        shown = 0
        while True:
            page = self.service.get(f"/v1/runs/{self.run_id}/steps", start=self.next_step, limit=PAGE_STEPS)
            for step in page["steps"]:
                self.emit(json.dumps(step_line(step, page["layers"] or layers)) if self.as_json else _step_text(step))
                self.next_step = step["step"] + 1
            shown += len(page["steps"])
            if len(page["steps"]) < PAGE_STEPS:
                return shown

    def incidents(self) -> None:
        listed = self.service.get(f"/v1/runs/{self.run_id}/incidents", limit=100)["incidents"]
        for i in sorted(listed, key=lambda i: (i["opened_step"], i["seq"])):
            key = (i["status"], i["severity"], i["last_step"])
            before = self.seen.get(i["id"])
            if before is not None and before[:2] == key[:2]:
                continue
            self.seen[i["id"]] = key
            if before is None and i["status"] != "open":
                what = "resolved"
            elif before is None:
                what = "opened"
            elif before[0] == "open" and i["status"] != "open":
                what = "resolved"
            else:
                what = "escalated" if i["severity"] == "critical" else "changed"
            if self.as_json:
                self.emit(json.dumps({"kind": "incident", "event": what, **i}))
            else:
                layer = f" in {i['layer']}" if i.get("layer") else ""
                at = i["resolved_step"] if what == "resolved" and i.get("resolved_step") is not None \
                    else i["opened_step"]
                self.emit(f"INCIDENT {what} at step {at}: {i['severity']} {i['signature']}{layer}: {i['message']}")


def _step_text(step: dict[str, Any]) -> str:
    parts = [f"step {step['step']:<7}"]
    for key, label in (("loss", "loss"), ("grad_norm", "grad_norm"), ("lr", "lr"), ("update_norm", "update")):
        if step.get(key) is not None:
            parts.append(f"{label} {fmt_value(step[key]):<10}")
    if step.get("skipped"):
        parts.append("(skipped)")
    return " ".join(parts).rstrip()


def run(args: argparse.Namespace) -> int:
    try:
        with service_from_args(args) as service:
            return _follow(service, args)
    except ServiceError as exc:
        print(f"gradwatch tail: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _follow(service: Service, args: argparse.Namespace) -> int:
    tail = _Tail(service, args.run_id, args.json)
    run = service.get(f"/v1/runs/{args.run_id}")
    if not args.json:
        tail.emit(f"following {run['run_id']} ({run['project']}, {run['status']}, {run['n_steps']} steps); "
                  "Ctrl-C to stop")
    last = run["last_step"]
    tail.next_step = 0 if last is None else max(0, last - max(0, args.lines) + 1)
    tail.steps(run["layers"])
    tail.incidents()
    while True:
        time.sleep(max(0.05, args.interval))
        run = service.get(f"/v1/runs/{args.run_id}")  # read first: steps stored before the status changed show
        new = tail.steps(run["layers"])
        tail.incidents()
        if run["status"] != "running" and not new and not args.forever:
            if not args.json:
                tail.emit(f"run {run['run_id']} is {run['status']}")
            return 0
