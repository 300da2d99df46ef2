"""Incident tracking: one incident per signature, opened, escalated and resolved with hysteresis."""

from __future__ import annotations

import json
import math

import pytest

from gradwatch.detect import SIGNATURES, DetectorConfig, Event
from gradwatch.incidents import new_incident_state, track_incidents


def _events(sig: str, step: int, severity: str = "warning") -> list[Event]:
    return [Event(sig, severity, step, 1.0, 1.0, None, "m")]


def test_incident_opens_once_and_resolves_after_the_quiet_period() -> None:
    cfg = DetectorConfig(resolve_after_steps=10)
    inc = new_incident_state()
    inc, opened, resolved = track_incidents(inc, _events("grad_spike", 5), 5, cfg)
    assert [(o["signature"], o["opened_at"]) for o in opened] == [("grad_spike", 5)]
    for t in range(6, 15):
        inc, opened, resolved = track_incidents(inc, [], t, cfg)
        assert not opened and not resolved
    inc, opened, resolved = track_incidents(inc, [], 15, cfg)
    assert [(r["signature"], r["opened_at"], r["resolved_at"]) for r in resolved] == [("grad_spike", 5, 15)]
    assert inc == new_incident_state()
    json.dumps(inc, allow_nan=False)


def test_a_flapping_signal_is_one_incident() -> None:
    cfg = DetectorConfig(resolve_after_steps=10)
    inc = new_incident_state()
    opened_all = []
    for t in range(100):
        events = _events("grad_spike", t) if t % 7 == 0 else []  # fires every 7 steps, quiet in between
        inc, opened, resolved = track_incidents(inc, events, t, cfg)
        opened_all += opened
        assert not resolved
    assert len(opened_all) == 1


def test_a_warning_incident_turning_critical_is_reported_again() -> None:
    inc = new_incident_state()
    inc, opened, _ = track_incidents(inc, _events("update_ratio", 1), 1)
    assert [o["severity"] for o in opened] == ["warning"]
    inc, opened, _ = track_incidents(inc, _events("update_ratio", 2, "critical"), 2)
    assert [(o["severity"], o["escalated"], o["opened_at"]) for o in opened] == [("critical", True, 1)]
    inc, opened, _ = track_incidents(inc, _events("update_ratio", 3, "critical"), 3)
    assert opened == []


@pytest.mark.parametrize("signature", SIGNATURES)
def test_signatures_open_separate_incidents(signature: str) -> None:
    inc = new_incident_state()
    inc, _, _ = track_incidents(inc, _events("grad_spike", 1), 1)
    inc, opened, _ = track_incidents(inc, _events(signature, 2), 2)
    assert len(opened) == (0 if signature == "grad_spike" else 1)


def test_an_incident_holds_non_finite_values_in_the_wire_spelling() -> None:
    """The incident state is stored as JSON next to the detector state: NaN and infinities are spelled out."""
    event = Event("nonfinite", "critical", 7, math.nan, math.inf, "block.0.weight", "m")
    inc, opened, _ = track_incidents(new_incident_state(), [event], 7)
    assert (opened[0]["value"], opened[0]["baseline"]) == ("NaN", "Infinity")
    assert json.loads(json.dumps(inc, allow_nan=False))["open"]["nonfinite"]["value"] == "NaN"
