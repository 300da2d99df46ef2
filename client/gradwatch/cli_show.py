"""`gradwatch show RUN`: one run at a glance: its summary, open and recent incidents, and unicode sparklines of
its loss and gradient norm over the whole run (read downsampled, so a long run costs what the width asks)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import Any

from ._format import NONFINITE_MARK, fmt_value, sparkline
from ._service import Service, ServiceError, add_connection_arguments, service_from_args

__all__ = ["add_arguments", "read_run_view", "run"]

RECENT_INCIDENTS = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN", help="the run's id")
    parser.add_argument("--width", type=int, default=None,
                        help="sparkline width in characters (default: to fit the terminal, at most 100)")
    parser.add_argument("--json", action="store_true", help="print the run, incidents and series as JSON")
    add_connection_arguments(parser)


def read_run_view(service: Service, run_id: str, width: int) -> dict[str, Any]:
    """What `show` prints: the run, its open and recent incidents, and its loss and grad norm series at about
    two points a character (each downsampled group keeps its minimum and maximum)."""
    run = service.get(f"/v1/runs/{run_id}")
    open_incidents = service.get(f"/v1/runs/{run_id}/incidents", status="open", limit=100)["incidents"]
    recent = service.get(f"/v1/runs/{run_id}/incidents", limit=RECENT_INCIDENTS)["incidents"]
    series = service.get(f"/v1/runs/{run_id}/series", fields="loss,grad_norm", max_points=2 * width)["series"]
    return {"run": run, "open_incidents": open_incidents, "recent_incidents": recent,
            "series": {s["field"]: {"steps": s["steps"], "values": s["values"]} for s in series}}


def run(args: argparse.Namespace) -> int:
    width = args.width or max(20, min(100, shutil.get_terminal_size((100, 24)).columns - 40))
    try:
        with service_from_args(args) as service:
            view = read_run_view(service, args.run_id, width)
    except ServiceError as exc:
        print(f"gradwatch show: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    print(render(view, width))
    return 0


def render(view: dict[str, Any], width: int) -> str:
    run = view["run"]
    lines = [f"run      {run['run_id']}" + (f"  ({run['name']})" if run.get("name") else ""),
             f"project  {run['project']} · status {run['status']} · {run['n_steps']} steps"
             + ("" if run["last_step"] is None else f" (last {run['last_step']})")
             + f" · {len(run['layers'])} layers · updated {run['updated_at'][:19].replace('T', ' ')} UTC", ""]
    steps = [st for s in view["series"].values() for st in s["steps"]]
    if steps:
        lo, hi = min(steps), max(steps)
        for field, label in (("loss", "loss"), ("grad_norm", "grad norm")):
            s = view["series"].get(field) or {"steps": [], "values": []}
            known = [v for v in s["values"] if v is not None]
            last = fmt_value(known[-1]) if known else "—"
            finite = [v for v in known if not isinstance(v, str)]
            span = f"min {fmt_value(min(finite))}, max {fmt_value(max(finite))}" if finite else "no finite values"
            lines.append(f"{label:<10} {sparkline(s['steps'], s['values'], width, lo, hi)}  last {last} ({span})")
        lines.append(f"{'':<10} {str(lo).ljust(width - len(str(hi)))}{hi}")
        lines.append(f"{'':<10} log scale · {NONFINITE_MARK} NaN or Infinity")
    else:
        lines.append("no steps yet")
    lines.append("")
    n_open = len(view["open_incidents"])
    lines.append(f"open incidents ({n_open})" if n_open else "open incidents: none")
    lines.extend(_incident(i) for i in view["open_incidents"])
    recent = [i for i in view["recent_incidents"] if i["status"] != "open"]
    if recent:
        lines.append("recently resolved")
        lines.extend(_incident(i) for i in recent)
    return "\n".join(lines)


def _incident(i: dict[str, Any]) -> str:
    """One incident (an episode: its headline signature, then every signature it showed, in order)."""
    layer = f" layer {i['layer']}" if i.get("layer") else ""
    evidence = i.get("evidence") or {}
    reason = (evidence.get("resolved") or {}).get("reason")
    resolved = f", resolved at {i['resolved_step']}" if i.get("resolved_step") is not None else ""
    resolved += f" ({reason})" if resolved and reason else ""
    line = f"  step {i['opened_step']:<6} {i['severity']:<8} {i['signature']:<15}{layer}{resolved}: {i['message']}"
    timeline = evidence.get("timeline") or []
    if len(timeline) > 1:
        line += "\n    " + " → ".join(f"{e['signature']} ({e['severity']}) at {e['step']}" for e in timeline)
    return line
