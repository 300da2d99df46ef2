"""Incidents: what an on-call person should hear about, made from the detectors' per-step events.

Pure and standard library only, like `gradwatch.detect`, whose events it reads: the service (under the run's
row lock), the client's local guard and `gradwatch replay` keep incidents with these functions::

    incidents = new_incident_state()
    incidents, opened, resolved = track_incidents(incidents, events, step, config, held)
    resolved = close_incidents(incidents, step, "run finished")        # when the run ends

**One incident per episode.** An explosion shows several signatures (a grad spike, then growth, the loss
running away, the weights swinging, NaN): they are one thing happening, so a run has at most one open
incident. The first event opens it and names the root-cause layer; later events of any signature join it
(its `timeline` records each signature as it joins, and each escalation); a critical event escalates a
warning incident once (reported in `opened` again, with "escalated": true), so an on-call person hears of an
episode when it opens, when it turns critical, and when it resolves — not once per signature.

It resolves once every signature in it has been quiet for `resolve_after_steps` steps and the detector holds
none of them (a held signature is still out, however long since it was measured); a run that ends with it
open closes it with that reason (`close_incidents`). The incident state is stored as JSON next to the
detector state, so incidents hold their values in the wire's spelling ("NaN", "Infinity").
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from gradwatch.wire import encode_value

if TYPE_CHECKING:
    from gradwatch.detect import DetectorConfig, Event

__all__ = ["RESOLVE_AFTER_STEPS", "RESOLVED_QUIET", "close_incidents", "new_incident_state", "track_incidents",
           "upgrade_incident_state"]

RESOLVE_AFTER_STEPS = 25
"""Quiet steps after which an incident resolves (`DetectorConfig.resolve_after_steps` defaults to this)."""
RESOLVED_QUIET = "back in band"
"""`resolved_reason` of an incident whose signatures all went quiet."""
INCIDENT_STATE_VERSION = 2

_SEVERITY_RANK = {"warning": 1, "critical": 2}


def new_incident_state() -> dict[str, Any]:
    """Incident bookkeeping for a run with nothing open."""
    return {"v": INCIDENT_STATE_VERSION, "open": None}


def upgrade_incident_state(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A state stored by version 1 (one incident per signature: {"open": {signature: incident}}) as one episode:
    the earliest incident, with the others' signatures in its timeline and its severity the highest of them.
    Returns the state and the signatures whose version-1 incidents were merged away (the service closes their
    rows)."""
    if state.get("v") == INCIDENT_STATE_VERSION:
        return state, []
    old = state.get("open") or {}
    if not isinstance(old, dict) or not old:
        return new_incident_state(), []
    ordered = sorted(old.values(), key=lambda inc: (inc["opened_at"], inc["signature"]))
    first = ordered[0]
    episode = _opened(first["signature"], first["severity"], first["opened_at"], first.get("layer"),
                      first.get("value"), first.get("baseline"), first["message"])
    episode["last_seen"] = max(inc["last_seen"] for inc in ordered)
    for inc in ordered[1:]:
        episode["signatures"][inc["signature"]] = inc["last_seen"]
        episode["timeline"].append(_entry(inc["opened_at"], inc["signature"], inc["severity"], inc["message"]))
        if _SEVERITY_RANK[inc["severity"]] > _SEVERITY_RANK[episode["severity"]]:
            episode.update(signature=inc["signature"], severity=inc["severity"], value=inc.get("value"),
                           baseline=inc.get("baseline"), message=inc["message"], escalated=True)
    episode["signatures"][first["signature"]] = first["last_seen"]
    return {"v": INCIDENT_STATE_VERSION, "open": episode}, [inc["signature"] for inc in ordered[1:]]


def _entry(step: int, signature: str, severity: str, message: str) -> dict[str, Any]:
    return {"step": step, "signature": signature, "severity": severity, "message": message}


def _opened(signature: str, severity: str, step: int, layer: str | None, value: Any, baseline: Any,
            message: str) -> dict[str, Any]:
    return {"signature": signature, "severity": severity, "opened_at": step, "last_seen": step, "layer": layer,
            "value": value, "baseline": baseline, "message": message, "escalated": False,
            "signatures": {signature: step}, "timeline": [_entry(step, signature, severity, message)]}


def _snapshot(inc: dict[str, Any]) -> dict[str, Any]:
    """A copy the caller may keep while the open incident goes on changing (its timeline entries never change)."""
    return {**inc, "signatures": dict(inc["signatures"]), "timeline": list(inc["timeline"])}


def track_incidents(incident_state: dict[str, Any], events: list[Event], step: int,
                    config: DetectorConfig | None = None, held: Collection[str] = ()
                    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Turn a step's events into incident changes.

    Returns the (updated in place) incident state, the incidents opened at this step (the episode when it
    opens, and again with "escalated": true when it turns critical) and those resolved at this step. Incidents
    are plain JSON-safe dicts: signature and severity (the signature that set the severity), opened_at,
    last_seen, layer (the root cause named by the first event), value, baseline, message, escalated,
    signatures (each signature in the episode -> the last step it fired), timeline (one entry per signature
    joining or escalating: step, signature, severity, message), plus resolved_at and resolved_reason once
    resolved.

    `held` names the signatures the detector still holds (`detect.held_signatures`): while any is held the
    incident does not resolve, however long it is quiet, because a signal measured only now and then (update
    norms, every `update_every` steps) is quiet between samples without being back.
    """
    inc = incident_state.get("open")
    if not events and inc is None:  # the common case: a quiet step with nothing open
        return incident_state, [], []
    if incident_state.get("v") != INCIDENT_STATE_VERSION:
        upgraded, _ = upgrade_incident_state(incident_state)
        incident_state.clear()
        incident_state.update(upgraded)
        inc = incident_state["open"]
    opened: list[dict[str, Any]] = []
    for ev in events:
        if inc is None:
            inc = incident_state["open"] = _opened(ev.signature, ev.severity, ev.step, ev.layer,
                                                   encode_value(ev.value), encode_value(ev.baseline), ev.message)
            opened.append(_snapshot(inc))
            continue
        signatures = inc["signatures"]
        joined = ev.signature not in signatures
        signatures[ev.signature] = ev.step
        inc["last_seen"] = ev.step
        if _SEVERITY_RANK[ev.severity] > _SEVERITY_RANK[inc["severity"]]:
            inc.update(signature=ev.signature, severity=ev.severity, value=encode_value(ev.value),
                       baseline=encode_value(ev.baseline), message=ev.message, escalated=True)
            if inc["layer"] is None:
                inc["layer"] = ev.layer
            inc["timeline"].append(_entry(ev.step, ev.signature, ev.severity, ev.message))
            opened.append(_snapshot(inc))
        elif joined:
            inc["timeline"].append(_entry(ev.step, ev.signature, ev.severity, ev.message))
    if inc is None:
        return incident_state, opened, []
    if held:  # still out as far as anyone knows: seen, so the quiet period starts when it is back
        inc["last_seen"] = step
        return incident_state, opened, []
    quiet_steps = config.resolve_after_steps if config is not None else RESOLVE_AFTER_STEPS
    if events or step - inc["last_seen"] < quiet_steps:
        return incident_state, opened, []
    return incident_state, opened, close_incidents(incident_state, step, RESOLVED_QUIET)


def close_incidents(incident_state: dict[str, Any], step: int, reason: str) -> list[dict[str, Any]]:
    """Resolve the open incident, if any, at `step` with `reason` (e.g. "run finished"): the run will send no
    more steps that could resolve it. Returns the incidents resolved (updated in place, like `track_incidents`)."""
    if incident_state.get("v") != INCIDENT_STATE_VERSION:
        upgraded, _ = upgrade_incident_state(incident_state)
        incident_state.clear()
        incident_state.update(upgraded)
    inc = incident_state.get("open")
    if inc is None:
        return []
    incident_state["open"] = None
    inc["resolved_at"] = step
    inc["resolved_reason"] = reason
    return [inc]
