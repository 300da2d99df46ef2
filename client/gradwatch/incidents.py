"""Incidents: what an on-call person should hear about, made from the detectors' per-step events.

Pure and standard library only, like `gradwatch.detect`, whose events it reads: the service (under the run's
row lock), the client's local guard and `gradwatch replay` keep incidents with these two functions::

    incidents = new_incident_state()
    incidents, opened, resolved = track_incidents(incidents, events, step, config)

An incident opens when its signature first fires, stays open while the signature keeps firing and resolves
once it has been quiet for `resolve_after_steps` steps (hysteresis: a flapping signal is one incident, not
many). The incident state is stored as JSON next to the detector state, so incidents hold their values in
the wire's spelling ("NaN", "Infinity"): they are the record that is persisted and shown, events are not.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from gradwatch.wire import encode_value

if TYPE_CHECKING:
    from gradwatch.detect import DetectorConfig, Event

__all__ = ["RESOLVE_AFTER_STEPS", "new_incident_state", "track_incidents"]

RESOLVE_AFTER_STEPS = 25
"""Quiet steps after which an incident resolves (`DetectorConfig.resolve_after_steps` defaults to this)."""

_SEVERITY_RANK = {"warning": 1, "critical": 2}


def new_incident_state() -> dict[str, Any]:
    """Incident bookkeeping for a run with nothing open: signature -> open incident."""
    return {"open": {}}


def track_incidents(incident_state: dict[str, Any], events: list[Event], step: int,
                    config: DetectorConfig | None = None, held: Collection[str] = ()
                    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Turn a step's events into incident changes.

    Returns the (updated in place) incident state, the incidents opened at this step (a warning incident that
    turns critical is reported again, with "escalated": true) and those resolved at this step. Incidents are
    plain JSON-safe dicts: signature, severity, opened_at, last_seen, layer, value, baseline, message
    (+ resolved_at once resolved).

    `held` names the signatures the detector still holds (`detect.held_signatures`): their incidents do not
    resolve however long they are quiet, because a signal measured only now and then (update norms, every
    `update_every` steps) is quiet between samples without being back.
    """
    open_ = incident_state["open"]
    if not events and not open_:  # the common case: a quiet step with nothing open
        return incident_state, [], []
    quiet_steps = config.resolve_after_steps if config is not None else RESOLVE_AFTER_STEPS
    opened: list[dict[str, Any]] = []
    resolved: list[dict[str, Any]] = []
    for ev in events:
        inc = open_.get(ev.signature)
        if inc is None:
            inc = {"signature": ev.signature, "severity": ev.severity, "opened_at": ev.step,
                   "last_seen": ev.step, "layer": ev.layer, "value": encode_value(ev.value),
                   "baseline": encode_value(ev.baseline), "message": ev.message, "escalated": False}
            open_[ev.signature] = inc
            opened.append(dict(inc))
            continue
        inc["last_seen"] = ev.step
        if _SEVERITY_RANK[ev.severity] > _SEVERITY_RANK[inc["severity"]]:
            inc.update(severity=ev.severity, value=encode_value(ev.value), baseline=encode_value(ev.baseline),
                       message=ev.message, escalated=True)
            if inc["layer"] is None:
                inc["layer"] = ev.layer
            opened.append(dict(inc))
    for signature in held:  # still out as far as anyone knows: seen, so its quiet period starts when it is back
        inc = open_.get(signature)
        if inc is not None:
            inc["last_seen"] = step
    fired = {ev.signature for ev in events}
    quiet = [s for s, inc in open_.items() if s not in fired and step - inc["last_seen"] >= quiet_steps]
    for sig in quiet:
        inc = open_.pop(sig)
        inc["resolved_at"] = step
        resolved.append(inc)
    return incident_state, opened, resolved
