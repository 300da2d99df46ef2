"""`gradwatch replay`: run the detectors over recorded traces and write the alerts an on-call person would get.

This is how detection quality is measured and how a detector change is tried before it ships: the same
`advance`/`track_incidents` the service runs, fed from trace files instead of HTTP batches. One alert line is
written when an incident opens (or a warning incident turns critical), not on every step that keeps it open,
so counting the lines counts pages. Lines use the format of the trace scorer (run_id, step, severity,
signature) plus layer, value, baseline and message.

Traces are JSON lines, plain (`*.jsonl`) or gzip-compressed (`*.jsonl.gz`): an optional header line with
"kind": "run" naming the run, then one line per optimizer step; non-finite values are the strings "NaN",
"Infinity" and "-Infinity".
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

from gradwatch.detect import DetectorConfig, Event, StepInput, advance, held_signatures, new_state
from gradwatch.incidents import new_incident_state, track_incidents
from gradwatch.wire import LAYER_FIELDS, SCALAR_FIELDS, decode_value, encode_value

__all__ = ["add_arguments", "config_with", "decode_step", "read_trace", "replay_run", "run", "trace_paths"]

TRACE_SUFFIXES = (".jsonl", ".jsonl.gz")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("traces", metavar="TRACES", help="a trace file, or a directory of *.jsonl / *.jsonl.gz")
    parser.add_argument("--out", default="-", metavar="FILE",
                        help="where to write alerts as JSON lines (default: standard output)")
    parser.add_argument("--every-event", action="store_true",
                        help="write every detector event, not only incident openings (for debugging)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                        help="override one DetectorConfig setting, e.g. --set growth_steps=2 (repeatable)")


def run(args: argparse.Namespace) -> int:
    try:
        paths = trace_paths(args.traces)
    except FileNotFoundError as exc:
        print(f"gradwatch replay: {exc}", file=sys.stderr)
        return 2
    if not paths:
        print(f"gradwatch replay: no *.jsonl or *.jsonl.gz traces in {args.traces}", file=sys.stderr)
        return 2
    try:
        config = config_with(args.overrides)
    except ValueError as exc:
        print(f"gradwatch replay: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    n_steps = n_alerts = 0
    out: IO[str]
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
    try:
        for path in paths:
            run_id, steps = read_trace(path)
            for alert in replay_run(run_id, steps, config, every_event=args.every_event):
                out.write(json.dumps(alert, allow_nan=False) + "\n")
                n_alerts += 1
            n_steps += len(steps)
    except ValueError as exc:
        print(f"gradwatch replay: {exc}", file=sys.stderr)
        return 1
    finally:
        if out is not sys.stdout:
            out.close()
    seconds = time.perf_counter() - started
    print(f"gradwatch replay: {len(paths)} runs, {n_steps} steps, {n_alerts} alerts "
          f"in {seconds:.1f} s", file=sys.stderr)
    return 0


def config_with(overrides: list[str]) -> DetectorConfig:
    """The default DetectorConfig with FIELD=VALUE settings applied, each converted to the field's type."""
    defaults = DetectorConfig()
    known = {f.name for f in dataclasses.fields(DetectorConfig)}
    changes: dict[str, Any] = {}
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(known))}")
        kind = type(getattr(defaults, name))
        try:
            changes[name] = kind(text)
        except ValueError:
            raise ValueError(f"--set {item!r}: {name} takes a {kind.__name__}") from None
    return dataclasses.replace(defaults, **changes)


def trace_paths(where: str) -> list[str]:
    """The trace files at `where`: the file itself, or the directory's traces in name order."""
    if os.path.isdir(where):
        return sorted(os.path.join(where, f) for f in os.listdir(where) if f.endswith(TRACE_SUFFIXES))
    if os.path.isfile(where):
        return [where]
    raise FileNotFoundError(f"no such file or directory: {where}")


def read_trace(path: str) -> tuple[str, list[StepInput]]:
    """The run id (from the header, else the file name) and the run's decoded step lines, in file order.

    One run is held in memory at a time: a few thousand steps, a few megabytes.
    """
    name = os.path.basename(path)
    run_id = name[: -len(".jsonl.gz")] if name.endswith(".jsonl.gz") else name.removesuffix(".jsonl")
    steps: list[StepInput] = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                if lineno == 1 and raw.get("kind") == "run":
                    run_id = str(raw.get("run_id") or run_id)
                    continue
                steps.append(decode_step(raw))
            except (ValueError, AttributeError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
    return run_id, steps


def decode_step(raw: dict[str, Any]) -> StepInput:
    """The detectors' input from a step line, its wire values ("NaN", "Infinity", ...) turned back into floats."""
    if raw.get("kind", "step") != "step":
        raise ValueError(f"expected a step line, got kind {raw.get('kind')!r}")
    if not isinstance(raw.get("step"), int):
        raise ValueError("a step line needs an integer 'step'")
    for key in SCALAR_FIELDS:
        v = raw.get(key)
        if v is not None and v.__class__ is not float:
            raw[key] = decode_value(v)
    for key in LAYER_FIELDS:
        m = raw.get(key)
        if m and not all(v.__class__ is float for v in m.values()):
            raw[key] = {name: decode_value(v) for name, v in m.items()}
    return StepInput.of(raw)


def replay_run(run_id: str, steps: Iterable[StepInput | Mapping[str, Any]], config: DetectorConfig, *,
               every_event: bool = False) -> Iterator[dict[str, Any]]:
    """The alert lines for one run: one per incident opened (or escalated), or one per event if asked."""
    state = new_state()
    incidents = new_incident_state()
    for item in steps:
        step = item if type(item) is StepInput else StepInput.of(item)  # type: ignore[arg-type]
        state, events = advance(state, step, config)
        incidents, opened, _ = track_incidents(incidents, events, step.step, config, held_signatures(state))
        if every_event:
            for ev in events:
                yield _event_line(run_id, ev)
        else:
            for inc in opened:
                yield {"run_id": run_id, "step": step.step, "severity": inc["severity"],
                       "signature": inc["signature"], "layer": inc["layer"], "value": inc["value"],
                       "baseline": inc["baseline"], "message": inc["message"]}


def _event_line(run_id: str, ev: Event) -> dict[str, Any]:
    return {"run_id": run_id, "step": ev.step, "severity": ev.severity, "signature": ev.signature,
            "value": encode_value(ev.value), "baseline": encode_value(ev.baseline), "layer": ev.layer,
            "message": ev.message}
