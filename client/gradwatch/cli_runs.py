"""`gradwatch runs`: the service's runs, newest first, with each one's latest loss and gradient norm and its
open incidents (`GET /v1/run-summaries`)."""

from __future__ import annotations

import argparse
import json
import sys

from ._format import fmt_value, table
from ._service import ServiceError, add_connection_arguments, service_from_args
from .wire import RUN_STATUSES

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", default=None, help="only this project's runs")
    parser.add_argument("--status", choices=RUN_STATUSES, default=None, help="only runs with this status")
    parser.add_argument("--limit", type=int, default=50, help="most runs to list (default 50, at most 1000)")
    parser.add_argument("--json", action="store_true", help="print the service's answer as JSON")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        with service_from_args(args) as service:
            listed = service.get("/v1/run-summaries", project=args.project, status=args.status,
                                 limit=max(1, min(args.limit, 1000)))
    except ServiceError as exc:
        print(f"gradwatch runs: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    rows = [[r["run_id"], r["project"], r["status"], str(r["n_steps"]),
             "—" if r["last_step"] is None else str(r["last_step"]), fmt_value(r.get("loss")),
             fmt_value(r.get("grad_norm")), _open(r), r["updated_at"][:19].replace("T", " ")]
            for r in listed["runs"]]
    if not rows:
        print("no runs")
        return 0
    print(table(["RUN", "PROJECT", "STATUS", "STEPS", "LAST STEP", "LOSS", "GRAD NORM", "OPEN INCIDENTS",
                 "UPDATED (UTC)"], rows))
    if listed["count"] > len(rows):
        print(f"({len(rows)} of {listed['count']}; --limit for more)")
    return 0


def _open(r: dict[str, int]) -> str:
    parts = [f"{r[key]} {name}" for key, name in (("open_criticals", "critical"), ("open_warnings", "warning"))
             if r.get(key)]
    return ", ".join(parts) or "0"
