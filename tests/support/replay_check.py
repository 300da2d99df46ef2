"""What a run's stored state must be: its stored steps replayed, in step order, through the pure detectors.

The service judges each batch's new steps under the run's lock and keeps the detector state, the incident rows and
one webhook per incident change. However the batches arrived (crashes, resends, several processes), a run ingested
correctly ends where a fresh replay of its stored steps ends (`gradwatch.detect.advance`, then
`gradwatch.incidents.track_incidents`), and it has the incidents and incident events the replay produces.

What a replay cannot reproduce, and how this helper deals with it:
- Late steps (stored after a later step had been judged) were never judged; the replay skips them too, and says
  how many there were (`Replay.late`), so a test that expects none can say so.
- The layer list each batch was judged with: the replay uses the run's final one, so runs whose layer list grew
  mid-way are out of scope (the tests log every layer from the first step).
- Times (`opened_at`, `updated_at`) and evidence: not compared; the detector config: the service's default.
- Numbers are compared as floats: PostgreSQL's jsonb hands back a float as large as 1.7976931348623157e308 (the
  detectors' "no limit") as the integer its decimal spells, which is the same limit to every comparison.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from gradwatch import detect
from gradwatch.incidents import close_incidents, new_incident_state, track_incidents
from gradwatch_service.incidents import STATE_DOC_VERSION
from gradwatch_service.queries import get_run_row, list_incidents, read_steps
from gradwatch_service.storage.db import read_connection
from gradwatch_service.storage.models import runs

__all__ = ["Replay", "assert_matches_replay", "comparable", "incident_events", "replay_stored",
           "stored_incidents"]

_INCIDENT_FIELDS = ("seq", "signature", "severity", "status", "opened_step", "last_step", "resolved_step", "layer",
                    "value", "baseline", "message")


@dataclass
class Replay:
    state_doc: dict[str, Any]
    """the detection document the service should have stored (runs.detector_state)"""
    incidents: list[dict[str, Any]]
    """the incident rows, by seq, as _INCIDENT_FIELDS (values in their wire spelling, as the API shows them)"""
    events: list[tuple[int, str, str]] = field(default_factory=list)
    """(seq, "firing" or "resolved", severity) of every incident change: one webhook each"""
    steps: int = 0
    late: int = 0
    signatures: set[str] = field(default_factory=set)
    """every signature that fired (an incident's own `signature` is only the one that set its severity)"""


def comparable(x: Any) -> Any:
    """A JSON document with every number as a float (see the module docstring), for ==."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, dict):
        return {k: comparable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [comparable(v) for v in x]
    return x


def replay_stored(engine: Engine, run_id: str, config: detect.DetectorConfig | None = None) -> Replay:
    """Replay the run's stored steps, skipping the late ones, as `gradwatch_service.incidents.advance_detection`
    keeps incidents: a new seq per opened incident, an escalation updates its own, a resolve closes it, and so
    does the run's end (a status other than running); the
    row's last_step is the last step one of its signatures fired (the resolving step's last_seen once resolved)."""
    config = config or detect.DetectorConfig()
    with read_connection(engine) as conn:
        run = get_run_row(conn, run_id)
        assert run is not None, run_id
        rows = read_steps(conn, run.id, start=None, end=None, limit=10**9)
    layers = list(run.layer_names)
    state = detect.new_state()
    inc_state = new_incident_state()
    seq: int | None = None  # the open incident's (one per episode)
    next_seq = 1
    expected: dict[int, dict[str, Any]] = {}
    events: list[tuple[int, str, str]] = []
    fired: set[str] = set()
    late = 0
    for r in rows:
        if r.late:
            late += 1
            continue
        step = {"step": r.step, "loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr, "update_norm": r.update_norm,
                "skipped": r.skipped, "layer_names": layers, "layer_grad_norms": r.layer_grad_norms,
                "layer_weight_norms": r.layer_weight_norms, "layer_update_norms": r.layer_update_norms}
        state, evs = detect.advance(state, step, config)
        inc_state, opened, resolved = track_incidents(inc_state, evs, r.step, config, detect.held_signatures(state))
        for inc in opened:
            if inc.get("escalated") and seq is not None:
                expected[seq].update(signature=inc["signature"], severity=inc["severity"], value=inc["value"],
                                     baseline=inc["baseline"], message=inc["message"], layer=inc["layer"])
                events.append((seq, "firing", inc["severity"]))
                continue
            seq = next_seq
            next_seq += 1
            expected[seq] = {"seq": seq, "signature": inc["signature"], "severity": inc["severity"],
                             "status": "open", "opened_step": inc["opened_at"], "last_step": inc["last_seen"],
                             "resolved_step": None, "layer": inc["layer"], "value": inc["value"],
                             "baseline": inc["baseline"], "message": inc["message"]}
            events.append((seq, "firing", inc["severity"]))
        fired.update(ev.signature for ev in evs)
        if evs and seq is not None:
            expected[seq]["last_step"] = max(ev.step for ev in evs)
        for inc in resolved:
            assert seq is not None
            expected[seq].update(status="resolved", resolved_step=inc["resolved_at"], last_step=inc["last_seen"])
            events.append((seq, "resolved", expected[seq]["severity"]))
            seq = None
    if run.status != "running" and seq is not None:  # the run ended with its incident open: that closed it
        (closed,) = close_incidents(inc_state, state["last_step"], f"run {run.status}")
        expected[seq].update(status="resolved", resolved_step=closed["resolved_at"], last_step=closed["last_seen"])
        events.append((seq, "resolved", expected[seq]["severity"]))
        seq = None
    doc = {"v": STATE_DOC_VERSION, "detector": state, "incidents": inc_state, "seq": seq, "next_seq": next_seq}
    return Replay(state_doc=json.loads(json.dumps(doc)), incidents=[expected[k] for k in sorted(expected)],
                  events=events, steps=len(rows) - late, late=late, signatures=fired)


def stored_incidents(engine: Engine, run_id: str) -> list[dict[str, Any]]:
    with read_connection(engine) as conn:
        found, _ = list_incidents(conn, run_id=run_id, limit=10**6)
    rows = [json.loads(i.model_dump_json()) for i in found]
    return sorted(({k: row[k] for k in _INCIDENT_FIELDS} for row in rows), key=lambda row: row["seq"])


def assert_matches_replay(engine: Engine, run_id: str) -> Replay:
    """The run's stored detector state and incident rows are the replay's; returns the replay."""
    expected = replay_stored(engine, run_id)
    with read_connection(engine) as conn:
        doc = conn.execute(select(runs.c.detector_state).where(runs.c.run_id == run_id)).scalar()
    if expected.steps == 0:
        assert doc is None
        return expected
    assert comparable(doc) == comparable(expected.state_doc), f"run {run_id}: detector state differs from the replay"
    assert stored_incidents(engine, run_id) == expected.incidents, f"run {run_id}: incidents differ from the replay"
    return expected


def incident_events(run_id: str, replay: Replay) -> Counter[tuple[str, str, str]]:
    """The webhooks the replay says the run's incident changes make: (incident id, status, severity) each."""
    return Counter((f"{run_id}#{seq}", event, severity) for seq, event, severity in replay.events)
