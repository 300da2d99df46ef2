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
from gradwatch.incidents import close_incidents, new_incident_state, track_incidents, upgrade_incident_state
from gradwatch.wire import decode_value, encode_value

from .alerting.outbox import enqueue_incident_event
from .storage.db import now_utc
from .storage.models import incidents

__all__ = ["DetectionOutcome", "advance_detection", "close_open_incident", "load_state"]

STATE_DOC_VERSION = 2


@dataclass
class DetectionOutcome:
    state_doc: dict[str, Any]
    raised: list[int]
    """seq of every incident this batch opened or escalated, still open or not: the job hears of each"""
    opened: list[tuple[str, str]] = field(default_factory=list)
    """(signature, severity) of each incident this batch opened"""


def load_state(doc: Any) -> dict[str, Any]:
    """The run's stored detection document, or a fresh one. `seq` is the seq of the run's open incident (one
    per episode: `gradwatch.incidents`), or None. A version-1 document (one incident per signature, `seq`
    mapping signature -> seq) is read as its upgrade; `merged` lists the seqs of the version-1 incidents that
    the upgrade folded into the open one, for `advance_detection` to close."""
    if isinstance(doc, dict) and doc.get("v") == STATE_DOC_VERSION:
        return doc
    if isinstance(doc, dict) and doc.get("v") == 1:
        inc_state, merged_away = upgrade_incident_state(doc.get("incidents") or {})
        seq_of: dict[str, int] = doc.get("seq") or {}
        episode = inc_state["open"]
        return {"v": STATE_DOC_VERSION, "detector": doc.get("detector") or detect.new_state(),
                "incidents": inc_state,
                "seq": None if episode is None else seq_of.get(episode["timeline"][0]["signature"]),
                "next_seq": doc.get("next_seq", 1), "merged": [seq_of[s] for s in merged_away if s in seq_of]}
    return {"v": STATE_DOC_VERSION, "detector": detect.new_state(), "incidents": new_incident_state(),
            "seq": None, "next_seq": 1}


def _evidence(inc: dict[str, Any], s: detect.StepInput) -> dict[str, Any]:
    return {"step": s.step, "signature": inc["signature"], "severity": inc["severity"], "layer": inc.get("layer"),
            "value": inc.get("value"), "baseline": inc.get("baseline"), "message": inc.get("message"),
            "values": {"loss": encode_value(s.loss), "grad_norm": encode_value(s.grad_norm),
                       "lr": encode_value(s.lr), "update_norm": encode_value(s.update_norm)}}


def _where(run_pk: int, seq: int) -> Any:
    return and_(incidents.c.run_pk == run_pk, incidents.c.seq == seq)


def advance_detection(conn: Connection, run_pk: int, state_doc: Any, new_steps: Sequence[detect.StepInput],
                      config: detect.DetectorConfig) -> DetectionOutcome:
    """Judge the batch's new, in-order steps (as `detect.advance` reads them: `StepColumns.detector_steps`);
    write incident changes. The caller stores the returned state."""
    doc = load_state(state_doc)
    state, inc_state = doc["detector"], doc["incidents"]
    now = now_utc()
    for seq in doc.pop("merged", ()):
        resolve_incident_row(conn, run_pk, seq, None, f"merged into incident {doc['seq']}", now)
    last = state.get("last_step")
    raised: list[int] = []
    opened_now: list[tuple[str, str]] = []
    last_fired = None  # the last step an event fired in this batch: the open incident's last step moves on
    for s in new_steps:
        t = s.step
        if last is not None and t <= last:
            continue  # late: stored and flagged by ingest, not judged
        state, events = detect.advance(state, s, config)
        last = t
        if not events and inc_state["open"] is None:
            continue
        inc_state, opened, resolved = track_incidents(inc_state, events, t, config, detect.held_signatures(state))
        if events:
            last_fired = max(ev.step for ev in events)
        for inc in opened:
            seq = doc["seq"]
            if inc.get("escalated") and seq is not None:
                conn.execute(update(incidents).where(_where(run_pk, seq)).values(
                    signature=inc["signature"], severity=inc["severity"], value=decode_value(inc.get("value")),
                    baseline=decode_value(inc.get("baseline")), message=inc["message"], layer=inc.get("layer"),
                    last_step=inc["last_seen"], updated_at=now,
                    evidence={"opened": _stored_evidence(conn, run_pk, seq), "escalated": _evidence(inc, s),
                              "timeline": inc["timeline"]}))
                enqueue_incident_event(conn, run_pk, seq)
                raised.append(seq)
                continue
            seq = doc["seq"] = doc["next_seq"]
            doc["next_seq"] = seq + 1
            conn.execute(insert(incidents).values(
                run_pk=run_pk, seq=seq, signature=inc["signature"], severity=inc["severity"], status="open",
                opened_step=inc["opened_at"], last_step=inc["last_seen"], layer=inc.get("layer"),
                value=decode_value(inc.get("value")), baseline=decode_value(inc.get("baseline")),
                message=inc["message"], evidence={"opened": _evidence(inc, s), "timeline": inc["timeline"]},
                opened_at=now, updated_at=now))
            enqueue_incident_event(conn, run_pk, seq)
            raised.append(seq)
            opened_now.append((inc["signature"], inc["severity"]))
        for inc in resolved:
            if doc["seq"] is not None:
                resolve_incident_row(conn, run_pk, doc["seq"], inc, inc["resolved_reason"], now)
            doc["seq"] = None
            last_fired = None
    episode = inc_state["open"]
    if last_fired is not None and episode is not None and doc["seq"] is not None:
        evidence = _stored(conn, run_pk, doc["seq"])
        evidence["timeline"] = episode["timeline"]
        conn.execute(update(incidents).where(_where(run_pk, doc["seq"]))
                     .values(last_step=last_fired, evidence=evidence, updated_at=now))
    doc["detector"], doc["incidents"] = state, inc_state
    return DetectionOutcome(state_doc=doc, raised=sorted(set(raised)), opened=opened_now)


def close_open_incident(conn: Connection, run_pk: int, state_doc: Any, reason: str) -> dict[str, Any] | None:
    """The run ended (`reason`, e.g. "run finished") with an incident open: resolve it at the run's last judged
    step, since no step can come to resolve it. Returns the detection document to store, or None if nothing
    was open."""
    if state_doc is None:
        return None
    doc = load_state(state_doc)
    now = now_utc()
    for seq in doc.pop("merged", ()):
        resolve_incident_row(conn, run_pk, seq, None, f"merged into incident {doc['seq']}", now)
    step = doc["detector"].get("last_step")
    resolved = close_incidents(doc["incidents"], -1 if step is None else int(step), reason)
    if not resolved:
        return None
    if doc["seq"] is not None:
        resolve_incident_row(conn, run_pk, doc["seq"], resolved[0], reason, now)
    doc["seq"] = None
    return doc


def resolve_incident_row(conn: Connection, run_pk: int, seq: int, inc: dict[str, Any] | None, reason: str,
                         now: Any) -> None:
    """Mark incident `seq` resolved with `reason` (kept in its evidence) and queue its `resolved` webhook."""
    evidence = _stored(conn, run_pk, seq)
    evidence["resolved"] = {"reason": reason}
    values: dict[str, Any] = {"status": "resolved", "resolved_at": now, "updated_at": now, "evidence": evidence}
    if inc is not None:
        values.update(resolved_step=inc["resolved_at"], last_step=inc["last_seen"])
        evidence["resolved"]["step"] = inc["resolved_at"]
        evidence["timeline"] = inc["timeline"]
    else:
        row = conn.execute(select(incidents.c.last_step).where(_where(run_pk, seq))).scalar()
        values["resolved_step"] = row
    conn.execute(update(incidents).where(and_(_where(run_pk, seq), incidents.c.status == "open")).values(**values))
    enqueue_incident_event(conn, run_pk, seq)


def _stored(conn: Connection, run_pk: int, seq: int) -> dict[str, Any]:
    ev = conn.execute(select(incidents.c.evidence).where(_where(run_pk, seq))).scalar()
    return dict(ev) if isinstance(ev, dict) else {}


def _stored_evidence(conn: Connection, run_pk: int, seq: int) -> Any:
    return _stored(conn, run_pk, seq).get("opened")
