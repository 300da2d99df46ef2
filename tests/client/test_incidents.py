"""Incident tracking: one incident per episode, opened, escalated and resolved with hysteresis, closed when the run
ends."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from gradwatch.detect import SIGNATURES, DetectorConfig, Event, advance, new_state
from gradwatch.incidents import close_incidents, new_incident_state, track_incidents, upgrade_incident_state

from .test_detect import LAYERS, make_step, noisy_steps, run


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
def test_the_signatures_of_one_episode_join_one_incident(signature: str) -> None:
    inc = new_incident_state()
    inc, _, _ = track_incidents(inc, _events("grad_spike", 1), 1)
    inc, opened, _ = track_incidents(inc, _events(signature, 2), 2)
    assert opened == []  # no second page
    episode = inc["open"]
    assert episode["signature"] == "grad_spike" and set(episode["signatures"]) == {"grad_spike", signature}
    assert [(e["step"], e["signature"]) for e in episode["timeline"]] == [(1, "grad_spike"), (2, signature)][
        : 1 if signature == "grad_spike" else 2]


def test_an_episode_pages_when_it_opens_when_it_turns_critical_and_when_it_resolves() -> None:
    """What `examples/train_tiny.py --explode` showed: four signatures of one explosion were four pages. They are
    one incident, escalated once, named after the signature that made it critical, with the first layer."""
    cfg = DetectorConfig(resolve_after_steps=10)
    inc = new_incident_state()
    pages = []
    script = {5: [("grad_spike", "warning", "layer.1")], 6: [("update_ratio", "warning", "layer.2")],
              7: [("grad_growth", "critical", "layer.3"), ("loss_divergence", "critical", None)],
              8: [("nonfinite", "critical", "layer.4"), ("grad_growth", "critical", "layer.3")]}
    for t in range(5, 30):
        events = [Event(sig, sev, t, 1.0, 1.0, layer, sig) for sig, sev, layer in script.get(t, [])]
        inc, opened, resolved = track_incidents(inc, events, t, cfg)
        pages += [("firing", o["severity"], o["signature"], o["layer"], t) for o in opened]
        pages += [("resolved", r["severity"], r["signature"], r["resolved_reason"], t) for r in resolved]
    assert pages == [("firing", "warning", "grad_spike", "layer.1", 5),
                     ("firing", "critical", "grad_growth", "layer.1", 7),
                     ("resolved", "critical", "grad_growth", "back in band", 18)]


def test_a_run_that_ends_with_an_incident_open_closes_it_with_that_reason() -> None:
    inc, _, _ = track_incidents(new_incident_state(), _events("grad_growth", 3, "critical"), 3)
    closed = close_incidents(inc, 40, "run finished")
    assert [(c["signature"], c["resolved_at"], c["resolved_reason"]) for c in closed] == [
        ("grad_growth", 40, "run finished")]
    assert inc == new_incident_state()
    assert close_incidents(inc, 41, "run finished") == []


def test_a_version_1_state_becomes_one_episode() -> None:
    """The service stores incident states of running runs: one incident per signature before episodes."""
    old = {"open": {
        "grad_spike": {"signature": "grad_spike", "severity": "warning", "opened_at": 4, "last_seen": 9,
                       "layer": "a", "value": 1.0, "baseline": 1.0, "message": "m1", "escalated": False},
        "grad_growth": {"signature": "grad_growth", "severity": "critical", "opened_at": 6, "last_seen": 8,
                        "layer": "b", "value": "NaN", "baseline": 1.0, "message": "m2", "escalated": False}}}
    state, merged = upgrade_incident_state(json.loads(json.dumps(old)))
    assert merged == ["grad_growth"]
    episode = state["open"]
    assert (episode["signature"], episode["severity"], episode["opened_at"], episode["last_seen"],
            episode["layer"], episode["value"]) == ("grad_growth", "critical", 4, 9, "a", "NaN")
    assert [(e["step"], e["signature"]) for e in episode["timeline"]] == [(4, "grad_spike"), (6, "grad_growth")]
    inc, opened, _ = track_incidents(json.loads(json.dumps(old)), _events("nonfinite", 10, "critical"), 10)
    assert opened == [] and set(inc["open"]["signatures"]) == {"grad_spike", "grad_growth", "nonfinite"}


def test_an_incident_holds_non_finite_values_in_the_wire_spelling() -> None:
    """The incident state is stored as JSON next to the detector state: NaN and infinities are spelled out."""
    event = Event("nonfinite", "critical", 7, math.nan, math.inf, "block.0.weight", "m")
    inc, opened, _ = track_incidents(new_incident_state(), [event], 7)
    assert (opened[0]["value"], opened[0]["baseline"]) == ("NaN", "Infinity")
    assert json.loads(json.dumps(inc, allow_nan=False))["open"]["value"] == "NaN"


def _lifecycle(steps: list[dict[str, object]]) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The detectors and incident tracking over a run, as the service runs them: (final detector state, every
    incident opened, every incident resolved)."""
    config = DetectorConfig()
    state, incidents = new_state(), new_incident_state()
    opened_all: list[dict[str, Any]] = []
    resolved_all: list[dict[str, Any]] = []
    for step in steps:
        state, events = advance(state, step, config)
        incidents, opened, resolved = track_incidents(incidents, events, step["step"], config)  # type: ignore[arg-type]
        opened_all += opened
        resolved_all += resolved
    return state, opened_all, resolved_all


def _exploding(level_after: float, steps_after: int) -> list[dict[str, object]]:
    """60 healthy steps, the grad norm climbing x1.5 a step to `level_after`, and staying there."""
    steps = noisy_steps(60, sigma=0.1)
    g, t = 1.0, 60
    while g < level_after:
        g *= 1.5
        steps.append(make_step(t, grad=g))
        t += 1
    steps += [make_step(t + i, grad=level_after) for i in range(steps_after)]
    return steps


def test_growth_to_a_new_level_stays_open_and_the_band_does_not_learn_it() -> None:
    """The defect `make demo` showed: the band learnt the exploded level, the signal looked normal again and
    the incident resolved while the run was still broken."""
    steps = _exploding(1e6, 300)
    healthy_band, _ = run(steps[:60])
    state, opened, resolved = _lifecycle(steps)
    assert [(i["signature"], i["severity"]) for i in opened] == [("grad_growth", "critical")]
    assert resolved == []
    assert state["g_mu"] == pytest.approx(healthy_band["g_mu"], abs=0.1)  # log space: within 10 %


def test_a_run_that_goes_non_finite_with_growth_still_out_leaves_the_incident_open() -> None:
    steps = _exploding(1e6, 5)
    t = int(steps[-1]["step"])  # type: ignore[call-overload]
    steps += [make_step(t + 1 + i, grad=math.inf, loss=math.nan) for i in range(100)]
    _, opened, resolved = _lifecycle(steps)
    assert [(i["signature"], i["severity"]) for i in opened] == [("grad_growth", "critical")]  # one page
    assert resolved == []


def test_growth_that_comes_back_to_its_baseline_resolves() -> None:
    """A healthy surge (every layer 4x, then 16x, for two steps) is growth; once the run is back near the
    baseline it broke, the incident resolves after the quiet period."""
    quiet = DetectorConfig().resolve_after_steps
    surge = [make_step(t, layer_grads={n: 4.0 ** (t - 59) for n in LAYERS}) for t in (60, 61)]
    steps = [*noisy_steps(60, sigma=0.1), *surge, *noisy_steps(2 * quiet, start=62, sigma=0.1)]
    _, opened, resolved = _lifecycle(steps)
    assert [(i["signature"], i["severity"], i["opened_at"]) for i in opened] == [("grad_growth", "critical", 61)]
    assert [(i["signature"], i["resolved_at"]) for i in resolved] == [("grad_growth", 61 + quiet)]


def test_a_healthy_spike_that_recovers_resolves() -> None:
    quiet = DetectorConfig().resolve_after_steps
    steps = [*noisy_steps(50, sigma=0.1), make_step(50, grad=100.0), *noisy_steps(2 * quiet, start=51, sigma=0.1)]
    _, opened, resolved = _lifecycle(steps)
    assert [(i["signature"], i["severity"], i["opened_at"]) for i in opened] == [("grad_spike", "warning", 50)]
    assert [(i["signature"], i["resolved_at"]) for i in resolved] == [("grad_spike", 50 + quiet)]


def test_a_state_from_version_2_is_upgraded_and_holds_nothing() -> None:
    steps = _exploding(1e6, 50)
    state, _ = run(steps[:60])
    old = json.loads(json.dumps(state))
    old["v"] = 2
    del old["held"]
    _, resumed = run(steps[60:], state=old)
    _, straight = run(steps)
    assert [(e.signature, e.step) for e in resumed] == [(e.signature, e.step) for e in straight if e.step >= 60]


def test_an_incident_the_detector_still_holds_stays_open_however_long_it_is_quiet() -> None:
    """A signal measured only now and then (update norms, every `update_every` steps) is quiet between samples
    without being back: its incident must outlast the quiet period while the detector holds the signature."""
    cfg = DetectorConfig(resolve_after_steps=10)
    inc, _, _ = track_incidents(new_incident_state(), _events("update_ratio", 0), 0, cfg)
    for t in range(1, 100):
        inc, _, resolved = track_incidents(inc, [], t, cfg, held={"update_ratio"})
        assert not resolved
    for t in range(100, 109):  # the hold ended after step 99 (the signal came back): the quiet period runs
        inc, _, resolved = track_incidents(inc, [], t, cfg)
        assert not resolved
    inc, _, resolved = track_incidents(inc, [], 109, cfg)
    assert [(r["signature"], r["last_seen"], r["resolved_at"]) for r in resolved] == [("update_ratio", 99, 109)]
