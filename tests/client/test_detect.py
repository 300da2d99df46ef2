"""The detectors on synthetic runs whose right answer is known, plus the state and incident contracts."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable

import pytest

from gradwatch.detect import DetectorConfig, Event, StepInput, advance, new_state
from gradwatch.wire import encode_value

LAYERS = ("embed.weight", "block.0.weight", "block.1.weight", "head.weight")


def make_step(t: int, *, grad: float = 1.0, loss: float = 2.0, layer_grads: dict[str, float] | None = None,
              update: float | None = 0.01, weight: float = 10.0, **extra: object) -> dict[str, object]:
    """A step line like the traces': total grad norm = L2 of the layer grad norms."""
    if layer_grads is None:
        layer_grads = {name: grad / 2.0 for name in LAYERS}  # 4 equal layers: total = grad
    total = math.sqrt(sum(v * v for v in layer_grads.values()))
    return {"step": t, "loss": loss, "lr": 0.1, "grad_norm": total,
            "layer_grad_norms": layer_grads,
            "layer_weight_norms": {name: weight / 2.0 for name in LAYERS},
            "update_norm": update, **extra}


def run(steps: Iterable[dict[str, object]], config: DetectorConfig | None = None,
        state: dict[str, object] | None = None) -> tuple[dict[str, object], list[Event]]:
    state = new_state() if state is None else state
    events: list[Event] = []
    for step in steps:
        state, evs = advance(state, step, config or DetectorConfig())
        events += evs
    return state, events


def spelled(events: Iterable[Event]) -> list[tuple[object, ...]]:
    """Events in a form that compares equal when their values are the same NaN (NaN != NaN as a float)."""
    return [(e.signature, e.severity, e.step, encode_value(e.value), encode_value(e.baseline), e.layer, e.message)
            for e in events]


def noisy_steps(n: int, seed: int = 0, start: int = 0, sigma: float = 0.3) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out = []
    for t in range(start, start + n):
        layer_grads = {name: math.exp(rng.gauss(0.0, sigma)) for name in LAYERS}
        out.append(make_step(t, layer_grads=layer_grads, loss=2.0 * math.exp(rng.gauss(0.0, 0.05)),
                             update=0.01 * math.exp(rng.gauss(0.0, sigma))))
    return out


def test_nan_in_one_layer_only_is_critical_and_names_that_layer() -> None:
    steps = noisy_steps(30)
    bad = make_step(30, layer_grads={"embed.weight": 0.5, "block.0.weight": 0.5,
                                     "block.1.weight": math.nan, "head.weight": 0.5})
    bad["grad_norm"] = 0.9  # the total was summed elsewhere and came out finite
    _, events = run([*steps, bad])
    assert [e.signature for e in events] == ["nonfinite"]
    (event,) = events
    assert event.severity == "critical"
    assert event.step == 30
    assert event.layer == "block.1.weight"
    assert event.value is not None and math.isnan(event.value)


def test_infinite_loss_is_nonfinite_at_once_even_without_history() -> None:
    _, events = run([make_step(0, loss=math.inf)])
    assert [(e.signature, e.severity) for e in events] == [("nonfinite", "critical")]
    assert events[0].value == math.inf


def test_clean_exponential_growth_fires_grad_growth_before_overflow() -> None:
    steps = noisy_steps(60)
    g = 1.0
    t = 60
    while g < 1e300:
        g *= 1.5
        steps.append(make_step(t, grad=g))
        t += 1
    _, events = run(steps)
    growth = [e for e in events if e.signature == "grad_growth"]
    assert growth, [e.signature for e in events]
    first = growth[0]
    assert first.severity == "critical"
    assert first.value is not None and math.isfinite(first.value) and first.value < 1e3
    assert first.step < 60 + 15
    assert not [e for e in events if e.severity == "critical" and e.step < 60]


def test_stationary_heavy_tailed_series_stays_quiet() -> None:
    """Log-normal grad norms (sigma 0.5: a 1-in-100 step is 3.2x the median) for 5,000 steps."""
    rng = random.Random(7)
    steps = []
    for t in range(5000):
        layer_grads = {name: math.exp(rng.gauss(0.0, 0.5)) for name in LAYERS}
        steps.append(make_step(t, layer_grads=layer_grads, loss=1.5 * math.exp(rng.gauss(0.0, 0.2)),
                               update=0.01 * math.exp(rng.gauss(0.0, 0.5))))
    _, events = run(steps)
    assert not [e for e in events if e.severity == "critical"]
    assert len(events) <= 5, [(e.signature, e.step) for e in events]


def test_state_survives_a_json_round_trip_mid_run_with_identical_events() -> None:
    steps = noisy_steps(80, seed=3)
    g = 1.0
    for t in range(80, 120):
        g *= 1.6
        steps.append(make_step(t, grad=g, loss=2.0 + 0.1 * (t - 80)))
    steps.append(make_step(120, loss=math.nan, grad=math.inf))

    _, straight = run(steps)
    assert straight, "the scenario should raise events"
    # during the bands' warm-up, after it, either side of the per-layer bands' learning step (every 32), and in
    # the middle of the climb
    for cut in (3, 15, 31, 32, 50, 65, 95):
        state, first_part = run(steps[:cut])
        text = json.dumps(state, allow_nan=False)  # raises if NaN or infinity leaked into the state
        _, second_part = run(steps[cut:], state=json.loads(text))
        assert spelled(first_part + second_part) == spelled(straight), cut


def test_a_json_round_trip_after_every_step_changes_nothing_in_the_service_form() -> None:
    """Round trips at every step, through warm-up, band updates, a layer that appears, breakouts and a climb."""
    names = list(LAYERS)
    steps: list[dict[str, object]] = []
    rng = random.Random(8)
    for t in range(140):
        if t == 50:
            names = [*names, "late.weight"]  # a layer appears: its band warms up while the others keep theirs
        level = 1.0 if t < 100 else 1.5 ** (t - 99)  # the whole network climbs from step 100
        grads = [level * math.exp(rng.gauss(0.0, 0.2)) for _ in names]
        if 80 <= t < 90:
            grads[1] *= 10.0  # one layer out of its band for a while
        steps.append({"step": t, "loss": 2.0 * math.exp(rng.gauss(0.0, 0.05)), "lr": 0.1,
                      "grad_norm": math.sqrt(sum(v * v for v in grads)), "update_norm": 0.01,
                      "layer_names": names, "layer_grad_norms": grads, "layer_weight_norms": [5.0] * len(names)})
    _, straight = run(steps)
    assert {e.signature for e in straight} >= {"grad_spike", "grad_growth"}
    state: dict[str, object] = new_state()
    events: list[Event] = []
    for step in steps:
        state, evs = advance(json.loads(json.dumps(state, allow_nan=False)), step, DetectorConfig())
        events += evs
    assert spelled(events) == spelled(straight)


def test_state_stays_json_safe_through_nonfinite_and_zero_values() -> None:
    steps = [*noisy_steps(25), make_step(25, grad=0.0, update=0.0, layer_grads={n: 0.0 for n in LAYERS}),
             make_step(26, loss=math.nan), make_step(27, update=math.inf), make_step(28, loss=None)]
    state, _ = run(steps)
    json.dumps(state, allow_nan=False)


def test_a_state_from_an_older_version_is_completed_not_rejected() -> None:
    state, _ = run(noisy_steps(30))
    old = {k: v for k, v in state.items() if not k.startswith("l")}  # as if the loss detectors were new
    old["v"] = 0
    state, events = advance(old, make_step(30), DetectorConfig())
    assert events == []
    assert state["v"] == new_state()["v"]
    assert set(state) == set(new_state())
    assert state["g_n"] == 31


def _version_1_state(steps: int) -> dict[str, object]:
    """What version 1 of the detector stored after `steps` quiet steps of `noisy_steps` (its keys, per-layer
    bands learned every step, no breakout limits, no geometric-mean band)."""
    return {"v": 1, "steps": steps, "last_step": steps - 1,
            "g_n": steps, "g_mu": 0.0, "g_dev": 0.2, "g_warm": [], "gr_n": 0, "gr_base": 0.0, "gr_dev": 0.0,
            "gw_n": 0, "l_n": steps, "l_first": 0.69, "l_sum": 6.9, "l_start": 0.69, "l_ewm": 0.69, "l_run": 0,
            "l_slow": 0.69, "l_best": 0.69, "lb_run": 0, "r_n": steps, "r_mu": -6.9, "r_dev": 0.2, "r_warm": [],
            "r_big": 0, "layers": list(LAYERS), "ly_n": steps, "ly_mu": [0.0] * 4, "ly_dev": [0.25] * 4,
            "out": {"head.weight": steps - 2}}


def test_a_version_1_state_keeps_its_layer_bands_and_gets_their_limits() -> None:
    state, events = advance(_version_1_state(40), make_step(40), DetectorConfig())
    assert events == []
    assert set(state) == set(new_state())
    assert state["layers"] == list(LAYERS)
    assert state["ly_young"] == {}
    z = DetectorConfig().layer_z
    assert state["ly_lim"] == pytest.approx([math.exp(z * 0.25)] * 4)  # exp(mu + z x dev), a plain norm
    assert state["out"] == {}  # make_step's layers (0.5) are all inside their bands: none is out any more
    json.dumps(state, allow_nan=False)
    # and the upgraded state goes on judging: a layer far above its band is out from the step it broke out
    state, _ = advance(state, make_step(41, layer_grads={**{n: 0.5 for n in LAYERS}, "block.0.weight": 50.0}),
                       DetectorConfig())
    assert state["out"] == {"block.0.weight": 41}


def test_a_version_1_state_still_warming_up_starts_its_layer_bands_over() -> None:
    state, events = advance(_version_1_state(5), make_step(5), DetectorConfig())
    assert events == []
    assert set(state["ly_young"]) == set(LAYERS)
    assert state["out"] == {}
    state, events = run(noisy_steps(40, start=6), state=state)
    assert events == []
    assert state["ly_young"] == {}
    assert all(math.isfinite(x) and x < 1e300 for x in state["ly_lim"])


def test_garbage_in_never_breaks_the_state() -> None:
    """Random mixes of None, 0, negatives, NaN, inf, vanishing and changing layers, skipped steps."""
    rng = random.Random(11)
    odd = [None, 0.0, -1.0, math.nan, math.inf, -math.inf, 5e-324, 1e-300, 1e300, 1.7e308]

    def value() -> float | None:
        return rng.choice(odd) if rng.random() < 0.1 else math.exp(rng.gauss(0.0, 2.0))

    state = new_state()
    for t in range(2000):
        names = rng.sample(LAYERS, rng.randint(0, len(LAYERS)))
        step: dict[str, object] = {"step": t, "loss": value(), "grad_norm": value(), "update_norm": value(),
                                   "lr": 0.1, "skipped": rng.random() < 0.05}
        if names and rng.random() < 0.5:
            step["layer_grad_norms"] = {n: value() for n in names}
            step["layer_weight_norms"] = {n: value() for n in names}
        elif names:  # the service's form: values aligned with layer_names, sometimes too few or too many
            step["layer_names"] = names
            step["layer_grad_norms"] = [value() for _ in range(len(names) + rng.choice((0, 0, 0, -1, 1)))]
            step["layer_weight_norms"] = [value() for _ in names]
        if rng.random() < 0.3 and names:
            step["layer_update_norms"] = ({n: value() for n in names} if "layer_names" not in step
                                          else [value() for _ in names])
        state, events = advance(state, step, DetectorConfig())
        assert all(type(v) is float for e in events for v in (e.value, e.baseline) if v is not None)
        state = json.loads(json.dumps(state, allow_nan=False))


def test_weights_and_updates_measured_every_20_steps_are_enough_and_quiet() -> None:
    """The torch client measures weight and update norms every 20 steps by default (step 0 included)."""
    steps = noisy_steps(600, seed=9)
    for step in steps:
        if step["step"] % 20:
            del step["update_norm"], step["layer_weight_norms"]
    state, events = run(steps)
    assert events == []
    assert state["r_n"] == 30
    _, events = run([make_step(0, update=150.0), *steps[1:40]])
    assert [(e.signature, e.severity, e.step) for e in events] == [("update_ratio", "critical", 0)]


def test_skipped_steps_do_not_alert_and_teach_nothing() -> None:
    steps = noisy_steps(40)
    state, _ = run(steps)
    before = json.dumps(state, sort_keys=True)
    skipped = make_step(40, grad=math.inf, loss=2.0, update=0.0, skipped=True,
                        layer_grads={n: math.inf for n in LAYERS})
    state, events = advance(state, skipped, DetectorConfig())
    assert events == []
    after = json.loads(json.dumps(state, sort_keys=True))
    assert after.pop("steps") == json.loads(before)["steps"] + 1
    assert after.pop("last_step") == 40
    expected = json.loads(before)
    expected.pop("steps")
    expected.pop("last_step")
    assert after == expected


def test_root_cause_is_the_layer_that_broke_out_first() -> None:
    steps = noisy_steps(60, sigma=0.1)
    # block.1 starts climbing first; head follows two steps later and ends up the largest
    for i, t in enumerate(range(60, 75)):
        layer_grads = {"embed.weight": 0.5, "block.0.weight": 0.5,
                       "block.1.weight": 0.5 * 2.0 ** (i + 1),
                       "head.weight": 0.5 * 4.0 ** max(0, i - 1)}
        steps.append(make_step(t, layer_grads=layer_grads))
    _, events = run(steps)
    critical = [e for e in events if e.severity == "critical"]
    assert critical, [(e.signature, e.step) for e in events]
    assert critical[0].signature == "grad_growth"
    assert critical[0].layer == "block.1.weight"


def test_a_layer_breaking_out_between_band_updates_is_recorded_at_the_step_it_broke_out() -> None:
    """The per-layer bands learn every `layer_every` steps; every step is compared with their limits."""
    cfg = DetectorConfig()
    steps = noisy_steps(100, sigma=0.1)
    t_out = 101
    assert t_out % cfg.layer_every  # not a learning step
    for t in range(100, 110):
        layer_grads = {n: 1.0 for n in LAYERS}
        if t >= t_out:
            layer_grads["block.0.weight"] = 3.0  # 3x: far out of its band, too small to move the total much
        steps.append(make_step(t, layer_grads=layer_grads))
    state, events = run(steps, cfg)
    assert state["out"] == {"block.0.weight": t_out}
    assert not [e for e in events if e.severity == "critical"]


def test_the_service_form_sequences_with_layer_names_gives_the_same_events_and_state() -> None:
    steps = noisy_steps(80, seed=4)
    for i, t in enumerate(range(80, 110)):  # block.1 climbs first, then the whole network; then a NaN
        steps.append(make_step(t, layer_grads={"embed.weight": 1.4 ** i, "block.0.weight": 1.4 ** i,
                                               "block.1.weight": 2.0 ** (i + 2), "head.weight": 1.4 ** i}))
    steps.append(make_step(110, layer_grads={**{n: 1.0 for n in LAYERS}, "head.weight": math.inf}))
    as_dicts, events = run(steps)
    assert {e.signature for e in events} >= {"grad_growth", "nonfinite"}
    names = list(LAYERS)
    as_lists = [{**s, "layer_names": names,
                 "layer_grad_norms": list(s["layer_grad_norms"].values()),  # type: ignore[attr-defined]
                 "layer_weight_norms": list(s["layer_weight_norms"].values())} for s in steps]  # type: ignore[attr-defined]
    state, list_events = run(as_lists)
    assert spelled(list_events) == spelled(events)
    assert json.dumps(state, sort_keys=True) == json.dumps(as_dicts, sort_keys=True)
    assert [e.layer for e in events if e.signature == "nonfinite"] == ["head.weight"]


def test_step_inputs_give_the_same_events_and_state_as_the_mappings_they_replace() -> None:
    steps = noisy_steps(80, seed=5)
    for i, t in enumerate(range(80, 100)):  # block.0 climbs, then a NaN
        steps.append(make_step(t, layer_grads={**{n: 1.0 for n in LAYERS}, "block.0.weight": 2.0 ** i}))
    steps.append(make_step(100, loss=math.nan))
    state, events = run(steps)
    assert {e.signature for e in events} >= {"grad_growth", "nonfinite"}
    typed = [StepInput.of(s) for s in steps]
    assert typed[3]["loss"] == steps[3]["loss"] and typed[3].step == 3  # a field reads both ways
    typed_state = new_state()
    typed_events: list[Event] = []
    for step in typed:
        typed_state, evs = advance(typed_state, step)
        typed_events += evs
    assert spelled(typed_events) == spelled(events)
    assert json.dumps(typed_state, sort_keys=True) == json.dumps(state, sort_keys=True)


def test_step_input_fields_are_in_the_wire_order_the_service_builds_them_in() -> None:
    import dataclasses

    from gradwatch.wire import LAYER_FIELDS, SCALAR_FIELDS

    # StepColumns.detector_steps builds StepInputs positionally: map(StepInput, steps, *scalars, skipped, ...)
    assert [f.name for f in dataclasses.fields(StepInput)] == ["step", *SCALAR_FIELDS, "skipped", "layer_names",
                                                               *LAYER_FIELDS]


def test_the_client_and_replay_build_step_inputs() -> None:
    from gradwatch._step import StepRecord
    from gradwatch.replay import decode_step

    record = StepRecord(step=7, loss=2.0, grad_norm=1.5, grad_norms={"a": 1.0}, weight_norms={"a": 3.0})
    step = record.as_detector_input()
    assert step == StepInput(7, 2.0, 1.5, None, None, False, None, {"a": 1.0}, {"a": 3.0}, {})
    decoded = decode_step({"step": 3, "loss": "NaN", "layer_grad_norms": {"a": "Infinity"}, "time": 1.0})
    assert type(decoded) is StepInput and decoded.step == 3 and math.isnan(decoded.loss or 0.0)
    assert decoded.layer_grad_norms == {"a": math.inf}


def test_a_plain_first_step_past_four_polyak_steps_is_critical() -> None:
    """make_step: lr 0.1, loss 2.0, weights 10.0. A plain step lr x g = 0.1 x 30 = 3.0 moves the weights by 0.3x
    (under ratio_gradient_step) and is u x g / loss = 3 x 30 / 2 = 45 Polyak steps: the loss must rise."""
    cfg = DetectorConfig()
    _, events = run([make_step(0, grad=30.0, update=3.0)])
    assert [(e.signature, e.severity, e.baseline) for e in events] == [
        ("update_ratio", "critical", cfg.polyak_limit)]
    assert events[0].value == pytest.approx(45.0)
    # the same step on a loss of 30 is 3 Polyak steps: a quadratic still comes down
    _, events = run([make_step(0, grad=30.0, update=3.0, loss=30.0)])
    assert not events
    # the same size of update that is not a plain gradient step (Adam's lr per coordinate) is not judged so
    _, events = run([make_step(0, grad=1.0, update=3.0)])
    assert not events
    # a step of 0.05x the weights, however many Polyak steps, is a loss near its floor, not an overshoot
    _, events = run([make_step(0, grad=5.0, update=0.5, loss=0.01)])
    assert not events
    # only the first update, and the rule can be turned off
    _, events = run([make_step(0), make_step(1, grad=30.0, update=3.0)])
    assert not events
    _, events = run([make_step(0, grad=30.0, update=3.0)], DetectorConfig(polyak_limit=0.0))
    assert not events


def test_the_whole_network_climbing_together_is_growth_after_two_steps() -> None:
    steps = noisy_steps(60, sigma=0.1)
    # noisy_steps' layers sit around 1.0 each; all four go to 4x, then 16x (growth_layer_min_factor is 3)
    steps += [make_step(t, layer_grads={n: 4.0 ** (t - 59) for n in LAYERS}) for t in (60, 61)]
    _, events = run(steps)
    assert [(e.signature, e.severity, e.step) for e in events][-1] == ("grad_growth", "critical", 61)


def test_one_layer_jumping_for_two_steps_is_not_growth() -> None:
    steps = noisy_steps(60, sigma=0.1)
    jump = {"embed.weight": 1.0, "block.0.weight": 1.0, "block.1.weight": 20.0, "head.weight": 1.0}
    steps += [make_step(t, layer_grads=jump) for t in (60, 61)]
    _, events = run(steps)
    assert [(e.signature, e.severity) for e in events] == [("grad_spike", "warning")] * 2
    assert {e.layer for e in events} == {"block.1.weight"}


def test_layers_appearing_later_are_tracked_without_losing_the_others() -> None:
    steps = noisy_steps(30)
    state, _ = run(steps)
    before = json.loads(json.dumps(state))
    extra = make_step(30, layer_grads={**{n: 1.0 for n in LAYERS}, "new.weight": 0.5})
    state, events = run([extra], state=state)
    assert "new.weight" in state["layers"]
    assert not events
    assert state["ly_young"] == {"new.weight": 1}  # its band warms up; the others keep theirs
    assert state["ly_lim"][:4] == before["ly_lim"]
    assert state["m_n"] == 1  # the geometric mean of five layers is a new quantity: its band started over
    more = [make_step(t, layer_grads={**{n: 1.0 for n in LAYERS}, "new.weight": 0.5}) for t in range(31, 60)]
    state, events = run(more, state=state)
    assert not events
    assert state["ly_young"] == {}
    assert state["ly_lim"][4] < 1e300


def test_first_update_many_times_the_weights_is_critical_at_step_zero() -> None:
    _, events = run([make_step(0, update=150.0, weight=10.0)])
    assert [(e.signature, e.severity) for e in events] == [("update_ratio", "critical")]
    assert events[0].baseline == DetectorConfig().ratio_critical


def test_one_bold_first_step_is_not_critical_but_two_in_a_row_are() -> None:
    _, events = run([make_step(0, update=50.0), make_step(1, update=0.5)])
    assert not [e for e in events if e.severity == "critical"]
    _, events = run([make_step(0, update=50.0), make_step(1, update=20.0)])
    assert [(e.signature, e.severity, e.step) for e in events] == [("update_ratio", "critical", 1)]


def test_a_plain_gradient_first_step_of_half_the_weights_is_critical() -> None:
    # make_step: lr 0.1, grad norm 1.0 and weights 10.0; an update of 6.0 is larger than lr x grad, so
    # it is not a plain gradient step (Adam-like) and 0.6x the weights is survivable
    _, events = run([make_step(0, update=6.0)])
    assert not [e for e in events if e.severity == "critical"]
    # the same relative size from a plain step: lr x grad = 0.1 x 60 = 6.0
    _, events = run([make_step(0, grad=60.0, update=6.0)])
    assert [(e.signature, e.severity, e.baseline) for e in events] == [
        ("update_ratio", "critical", DetectorConfig().ratio_gradient_step)]
    # only the first update is read this way
    _, events = run([make_step(0), make_step(1, grad=60.0, update=6.0)])
    assert not [e for e in events if e.severity == "critical"]


def test_loss_divergence_when_the_loss_stays_far_above_its_early_level() -> None:
    rng = random.Random(1)
    steps = noisy_steps(50, seed=1)
    for t in range(50, 80):
        steps.append(make_step(t, loss=2.0 * 4.0 * math.exp(rng.gauss(0.0, 0.05))))
    _, events = run(steps)
    first, *still = [e for e in events if e.signature == "loss_divergence"]
    assert first.severity == "critical"
    assert 50 < first.step <= 65  # smoothing (~8 steps to cross) + loss_steps (5)
    assert [e.step for e in still] == list(range(first.step + 1, 80))  # held open while the loss stays up


def test_loss_giving_back_most_of_its_progress_is_divergence() -> None:
    """Trained from 2.0 down to 0.2, then back up to 1.2 over 20 steps (a creep, not a jump): never above its
    start, but most progress is gone."""
    rng = random.Random(5)
    losses = [2.0 * 0.1 ** min(1.0, t / 100) for t in range(200)] + [0.2 * 6 ** (k / 20) for k in range(1, 21)]
    losses += [1.2] * 40
    steps = [make_step(t, loss=v * math.exp(rng.gauss(0.0, 0.1))) for t, v in enumerate(losses)]
    _, events = run(steps)
    first, *still = [e for e in events if e.signature == "loss_divergence"]
    assert first.severity == "critical"
    assert 200 < first.step < 260
    assert "given back" in first.message
    assert [e.step for e in still] == list(range(first.step + 1, 260))

    _, quiet = run(steps[:200])  # the same run without the climb back: nothing
    assert not [e for e in quiet if e.signature == "loss_divergence"]


def test_a_lone_spike_is_a_warning_not_growth() -> None:
    steps = [*noisy_steps(50, sigma=0.1), make_step(50, grad=100.0), *noisy_steps(30, start=51, sigma=0.1)]
    _, events = run(steps)
    assert [(e.signature, e.severity, e.step) for e in events] == [("grad_spike", "warning", 50)]


def test_a_ratio_sampled_sparsely_and_still_out_keeps_its_incident_open() -> None:
    """watch() samples update norms 20 to 500 steps apart: a ratio that broke out and is still out at every
    sample keeps the update_ratio incident open through the unmeasured steps in between (the demo's exploding
    run once showed it resolved while the run blew up)."""
    from gradwatch.detect import held_signatures
    from gradwatch.incidents import new_incident_state, track_incidents

    steps = noisy_steps(1500, seed=9)
    for step in steps:
        if step["step"] % 30:  # 30 steps apart: longer than the quiet period that resolves an incident (25)
            del step["update_norm"], step["layer_weight_norms"]
        elif step["step"] >= 900:  # the band has its 20 samples by then
            step["update_norm"] = 5.0  # 500x the usual 0.01 and never back
    state, incidents = new_state(), new_incident_state()
    opened, resolved = [], []
    for step in steps:
        state, events = advance(state, step, DetectorConfig())
        incidents, o, r = track_incidents(incidents, events, int(step["step"]), DetectorConfig(),  # type: ignore[call-overload]
                                          held_signatures(state))
        opened += o
        resolved += r
    assert [(o["signature"], o["opened_at"]) for o in opened] == [("update_ratio", 900)]
    assert resolved == []
