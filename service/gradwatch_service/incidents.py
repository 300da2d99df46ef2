"""Incident rows, kept inside the ingest transaction: advance the run's detector state, open and resolve incidents.

Runs under the run's row lock, in the same transaction as the steps it judges, so any replica can take any
batch and a crash loses neither steps nor incidents. The detectors and the incident lifecycle themselves are
`gradwatch.detect` and `gradwatch.incidents` (pure, shared with the client and replay); this module only feeds
them and keeps the incident rows in step: it is where incidents meet the database.
Steps older than the state's last step arrived late: they are stored (flagged) but not judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, insert, select, update

from gradwatch import detect
from gradwatch.incidents import new_incident_state, track_incidents
from gradwatch.wire import decode_value, encode_value

from .alerting.outbox import enqueue_incident_event
from .storage.db import now_utc
from .storage.models import incidents

__all__ = ["DetectionOutcome", "advance_detection", "load_state"]

STATE_DOC_VERSION = 1


@dataclass
class DetectionOutcome:
    state_doc: dict[str, Any]
    raised: list[int]
    """seq of every incident this batch opened or escalated, still open or not: the job hears of each"""
    opened: list[tuple[str, str]] = field(default_factory=list)
    """(signature, severity) of each incident this batch opened"""


def load_state(doc: Any) -> dict[str, Any]:
    """The run's stored detection document, or a fresh one."""
    if isinstance(doc, dict) and doc.get("v") == STATE_DOC_VERSION:
        return doc
    return {"v": STATE_DOC_VERSION, "detector": detect.new_state(), "incidents": new_incident_state(),
            "seq": {}, "next_seq": 1}


def _evidence(inc: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    return {"step": s["step"], "signature": inc["signature"], "severity": inc["severity"], "layer": inc.get("layer"),
            "value": inc.get("value"), "baseline": inc.get("baseline"), "message": inc.get("message"),
            "values": {k: encode_value(s[k]) for k in ("loss", "grad_norm", "lr", "update_norm")}}


def advance_detection(conn: Connection, run_pk: int, state_doc: Any, new_steps: Sequence[dict[str, Any]],
                      config: detect.DetectorConfig) -> DetectionOutcome:
    """Judge the batch's new, in-order steps (as `detect.advance` reads them: `StepColumns.detector_steps`);
    write incident changes. The caller stores the returned state."""
    doc = load_state(state_doc)
    state, inc_state, seq_of = doc["detector"], doc["incidents"], doc["seq"]
    last = state.get("last_step")
    now = now_utc()
    raised: list[int] = []
    opened_now: list[tuple[str, str]] = []
    touched: dict[str, int] = {}  # signature -> last step it fired in this batch
    for s in new_steps:
        t = s["step"]
        if last is not None and t <= last:
            continue  # late: stored and flagged by ingest, not judged
        state, events = detect.advance(state, s, config)
        last = t
        if not events and not inc_state["open"]:
            continue
        inc_state, opened, resolved = track_incidents(inc_state, events, t, config, detect.held_signatures(state))
        for ev in events:
            touched[ev.signature] = ev.step
        for inc in opened:
            sig = inc["signature"]
            if inc.get("escalated") and sig in seq_of:
                conn.execute(update(incidents).where(and_(incidents.c.run_pk == run_pk, incidents.c.seq == seq_of[sig]))
                             .values(severity=inc["severity"], value=decode_value(inc.get("value")),
                                     baseline=decode_value(inc.get("baseline")), message=inc["message"],
                                     layer=inc.get("layer"), updated_at=now,
                                     evidence={"opened": _stored_evidence(conn, run_pk, seq_of[sig]),
                                               "escalated": _evidence(inc, s)}))
                enqueue_incident_event(conn, run_pk, seq_of[sig])
                raised.append(seq_of[sig])
                continue
            seq = doc["next_seq"]
            doc["next_seq"] = seq + 1
            seq_of[sig] = seq
            conn.execute(insert(incidents).values(
                run_pk=run_pk, seq=seq, signature=sig, severity=inc["severity"], status="open",
                opened_step=inc["opened_at"], last_step=inc["last_seen"], layer=inc.get("layer"),
                value=decode_value(inc.get("value")), baseline=decode_value(inc.get("baseline")),
                message=inc["message"], evidence={"opened": _evidence(inc, s)}, opened_at=now, updated_at=now))
            enqueue_incident_event(conn, run_pk, seq)
            raised.append(seq)
            opened_now.append((sig, inc["severity"]))
        for inc in resolved:
            seq = seq_of.pop(inc["signature"], None)
            if seq is None:
                continue
            conn.execute(update(incidents).where(and_(incidents.c.run_pk == run_pk, incidents.c.seq == seq))
                         .values(status="resolved", resolved_step=inc["resolved_at"], last_step=inc["last_seen"],
                                 resolved_at=now, updated_at=now))
            enqueue_incident_event(conn, run_pk, seq)
            touched.pop(inc["signature"], None)
    for sig, step in touched.items():
        if sig in seq_of:
            conn.execute(update(incidents).where(and_(incidents.c.run_pk == run_pk, incidents.c.seq == seq_of[sig]))
                         .values(last_step=step, updated_at=now))
    doc["detector"], doc["incidents"] = state, inc_state
    return DetectionOutcome(state_doc=doc, raised=sorted(set(raised)), opened=opened_now)


def _stored_evidence(conn: Connection, run_pk: int, seq: int) -> Any:
    ev = conn.execute(select(incidents.c.evidence).where(and_(incidents.c.run_pk == run_pk,
                                                              incidents.c.seq == seq))).scalar()
    return (ev or {}).get("opened") if isinstance(ev, dict) else None
