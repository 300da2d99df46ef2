"""Exploding-gradient detectors: pure, incremental, standard library only.

The service, the client's local guard and `gradwatch replay` all run this one implementation, so it has no
clock, does no I/O and keeps everything it remembers in a small JSON-serialisable dict::

    state = new_state()
    state, events = advance(state, step, config)          # once per optimizer step, in order

`advance` updates `state` in place and returns it (a per-step copy would cost more than the detection);
callers must carry on with the returned state. The state never holds NaN or infinities, so it survives
`json.dumps`/`json.loads` between batches, and a run resumed from a round-tripped state raises exactly the
events it would have raised without the round trip.

Everything is measured in log space against robust, self-calibrating bands: seeded with the median of a
run's first samples, then an exponentially weighted mean whose input is clipped to a few deviations (so one
spike cannot drag it) and an exponentially weighted mean absolute deviation. Heavy-tailed but healthy series
widen their own band instead of paging someone; the only absolute limits are the ones nothing healthy
crosses (non-finite values, updates as large as the weights before a run has a history).
docs/detection.md explains each signature, its settings and how well it does on the labelled traces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradwatch.wire import encode_value

__all__ = [
    "SIGNATURES",
    "DetectorConfig",
    "Event",
    "advance",
    "new_incident_state",
    "new_state",
    "track_incidents",
]

SIGNATURES = ("nonfinite", "grad_spike", "grad_growth", "loss_divergence", "update_ratio")
WARNING = "warning"
CRITICAL = "critical"
STATE_VERSION = 1

_log = math.log
_isfinite = math.isfinite
_PLAIN_STEP_TOLERANCE = 1.05  # weight decay adds a little to a plain gradient step
_TINY = 1e-300  # norms of exactly 0 (a dead layer) are floored here before taking the log


@dataclass(frozen=True)
class DetectorConfig:
    """Every threshold the detectors use. The defaults are the one configuration docs/detection.md scores.

    Bands are exponentially weighted in log space; a factor of 10 in a norm is log(10) = 2.3 log units.
    """

    # --- robust bands (grad norm, update ratio, per-layer grad norms)
    band_alpha: float = 0.05
    """Weight of a new sample in a band's mean and deviation (a memory of about 1 / alpha = 20 steps)."""
    band_clip: float = 3.0
    """A sample moves a band as if it were at most this many deviations away (ZClip-style clipping)."""
    band_dev_floor: float = 0.1
    """Least deviation a band judges with, in log units (10 %): a flat series is not razor-thin."""
    warmup_steps: int = 20
    """Samples a band needs before it is trusted for spike, growth and ratio tests."""

    # --- grad_spike (warning)
    spike_z: float = 6.0
    """A grad norm this many band deviations above the band mean is a spike ..."""
    spike_min_factor: float = 5.0
    """... if it is also at least this many times the band's typical value."""

    # --- grad_growth (critical)
    growth_z: float = 3.5
    """A step counts towards growth when its grad norm is this many deviations above the band at its start."""
    growth_steps: int = 4
    """Consecutive counting steps needed (a lone spike is a grad_spike, not growth) ..."""
    growth_min_factor: float = 5.0
    """... and the grad norm must have grown this many times over the band at the start."""
    growth_layer_share: float = 0.8
    """Growth, too, when at least this share of the layers is out of its own band (see `layer_z`) ..."""
    growth_layer_steps: int = 2
    """... for this many consecutive steps ..."""
    growth_layer_min_factor: float = 2.0
    """... while the total grad norm is at least this many times its band: the whole network is climbing
    together, which a spike in one layer never does."""
    growth_layer_min_layers: int = 4
    """The network-wide test needs at least this many layers to mean anything."""

    # --- loss_divergence (critical)
    loss_alpha: float = 0.2
    """Weight of a new loss in the smoothed log loss (about 5 steps of memory)."""
    loss_start_steps: int = 10
    """The early baseline is the lower of the first loss and the mean (in log space) of the first N losses."""
    loss_factor: float = 3.0
    """The smoothed loss is divergent while above this many times the early baseline ..."""
    loss_steps: int = 5
    """... for this many consecutive steps (this also applies to the give-back test below)."""
    loss_giveback_alpha: float = 0.05
    """Weight of a new loss in the slow smoothed log loss that tracks progress (about 20 steps of memory)."""
    loss_giveback_share: float = 0.7
    """Divergent, too, when the slow smoothed loss has given back this share of the progress it made (in log
    space, from the early baseline down to its best level) ..."""
    loss_giveback_min_progress: float = 2.0
    """... provided the run had improved at least this many times on its early baseline: only real progress can
    be lost, and a run that never learned much is judged by `loss_factor` alone."""

    # --- update_ratio (update norm / weight norm)
    ratio_z: float = 6.0
    """Warning when the update ratio is this many band deviations above its band mean ..."""
    ratio_min_factor: float = 5.0
    """... and at least this many times its typical value."""
    ratio_critical: float = 10.0
    """Critical when, before the ratio band has warmed up, one update is this many times the weight norm: the
    step replaced the network rather than trained it. Only the first steps can catch runs that blow up in
    their first update, and they have no history to compare with."""
    ratio_sustained: float = 1.0
    """Critical, too, when (still before the band has warmed up) updates at least this many times the weight
    norm come `ratio_sustained_steps` times in a row: one step that outgrows the weights can be a bold start,
    consecutive ones are the weights running away."""
    ratio_sustained_steps: int = 2
    ratio_gradient_step: float = 0.5
    """Critical, too, when the run's first update is a plain gradient step that moves the weights by this share
    of their norm. The first update is a plain gradient step when it is no larger than lr x grad norm: SGD's
    always is (momentum buffers start empty; clipping only shrinks it), Adam's is lr per coordinate whatever
    the gradient. A plain step that big means the learning rate is past what the loss surface allows, and
    the next gradient, and step, will be bigger still; Adam's normalised steps cannot compound like that,
    which is why a bold first Adam step is often survived. Later steps are not judged this way: momentum
    and optimizer state blur what "plain" means."""

    # --- root cause
    layer_z: float = 3.0
    """A layer's grad norm this many deviations above its own band has broken out (root-cause bookkeeping)."""

    # --- incidents
    resolve_after_steps: int = 25
    """An incident resolves once its signature has been quiet for this many steps (hysteresis)."""


@dataclass
class Event:
    """One detector finding at one step. `baseline` is the band value or limit the measurement broke."""

    signature: str
    severity: str
    step: int
    value: float | None
    baseline: float | None
    layer: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite floats become "NaN", "Infinity", "-Infinity" as on the wire."""
        return {
            "signature": self.signature,
            "severity": self.severity,
            "step": self.step,
            "value": encode_value(self.value),
            "baseline": encode_value(self.baseline),
            "layer": self.layer,
            "message": self.message,
        }


def new_state() -> dict[str, Any]:
    """Detector state for a run that has not sent a step yet."""
    return {
        "v": STATE_VERSION,
        "steps": 0,  # steps seen (skipped ones included)
        "last_step": None,
        # grad norm band (log space)
        "g_n": 0, "g_mu": 0.0, "g_dev": 0.0, "g_warm": [],
        # grad growth: consecutive steps above the band held when the climb started (gr_*), and
        # consecutive steps with most layers out of their bands (gw_n)
        "gr_n": 0, "gr_base": 0.0, "gr_dev": 0.0, "gw_n": 0,
        # loss: early baseline, smoothed log loss, consecutive divergent steps
        "l_n": 0, "l_first": 0.0, "l_sum": 0.0, "l_start": 0.0, "l_ewm": 0.0, "l_run": 0,
        # loss give-back: slow smoothed log loss, its best level, consecutive steps past the share
        "l_slow": 0.0, "l_best": 0.0, "lb_run": 0,
        # update ratio band (log of update norm / weight norm)
        "r_n": 0, "r_mu": 0.0, "r_dev": 0.0, "r_warm": [], "r_big": 0,
        # per-layer grad norm bands, aligned with "layers"
        "layers": [], "ly_n": 0, "ly_mu": [], "ly_dev": [],
        # layers now above their band: name -> first step out (the root-cause candidates)
        "out": {},
    }


def _upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """A state stored by another version of this module, with whatever it lacks taken from a fresh state.

    The service keeps states in its database across upgrades; a new detector starts from scratch only on the
    parts it did not have before.
    """
    fresh = new_state()
    fresh.update({k: v for k, v in state.items() if k in fresh and k != "v"})
    return fresh


_GRAD_BAND = ("g_n", "g_mu", "g_dev", "g_warm")
_RATIO_BAND = ("r_n", "r_mu", "r_dev", "r_warm")


def _band_learn(state: dict[str, Any], keys: tuple[str, str, str, str], x: float, cfg: DetectorConfig) -> None:
    """Teach a band one sample (log space).

    The first `warmup_steps` samples are kept and the band is their median and mean absolute deviation from
    it, so a wild first step (common: the untrained model) cannot skew the band for long. After that the
    band is an EWMA whose input is clipped to `band_clip` deviations, ZClip-style: one spike moves it
    a little, a lasting change of level moves it all the way within a few band memories.
    """
    kn, kmu, kdev, kwarm = keys
    n = state[kn]
    state[kn] = n + 1
    if n < cfg.warmup_steps:
        warm = state[kwarm]
        warm.append(x)
        ordered = sorted(warm)
        k = len(ordered)
        mid = ordered[k // 2] if k % 2 else 0.5 * (ordered[k // 2 - 1] + ordered[k // 2])
        state[kmu] = mid
        state[kdev] = sum(abs(v - mid) for v in ordered) / k
        if n + 1 == cfg.warmup_steps:
            warm.clear()
        return
    mu = state[kmu]
    dev = state[kdev]
    d = x - mu
    lim = cfg.band_clip * (dev if dev > cfg.band_dev_floor else cfg.band_dev_floor)
    if d > lim:
        d = lim
    elif d < -lim:
        d = -lim
    a = cfg.band_alpha
    state[kmu] = mu + a * d
    state[kdev] = dev + a * ((d if d >= 0.0 else -d) - dev)


def _nonfinite_layer(*maps: Mapping[str, Any] | None) -> str | None:
    """The first layer (in the step's order) with a non-finite norm, or None. A sum is finite only if every
    term is, so the common all-finite case costs one C-level sum per map."""
    for m in maps:
        if not m:
            continue
        try:
            if _isfinite(sum(m.values())):
                continue
        except TypeError:  # a None among the values
            if _isfinite(sum(v for v in m.values() if v is not None)):
                continue
        for name, v in m.items():
            if v is not None and not _isfinite(v):
                return name
    return None


def _root_cause(state: dict[str, Any], norms: Mapping[str, Any] | None, cfg: DetectorConfig) -> str | None:
    """The layer to blame: the one that broke out of its own band first and is still out; failing that (every
    layer is noisy enough to stay inside its band), the layer furthest above its band right now. Only called
    when an event fires, so the O(layers) fallback costs nothing on quiet steps."""
    out = state["out"]
    if out:
        return min(out.items(), key=lambda kv: (kv[1], kv[0]))[0]
    if not norms or state["ly_n"] < 2 or list(norms) != state["layers"]:
        return None
    floor = cfg.band_dev_floor
    best, best_z = None, 0.0
    for name, v, mu, dev in zip(state["layers"], norms.values(), state["ly_mu"], state["ly_dev"], strict=True):
        if v is None or not v > 0.0 or not _isfinite(v):
            continue
        z = (_log(v) - mu) / (dev if dev > floor else floor)
        if z > best_z:
            best, best_z = name, z
    return best


def _track_layers(state: dict[str, Any], norms: Mapping[str, Any], step: int, cfg: DetectorConfig) -> None:
    """Advance every layer's band and remember which layers have broken out of it, and since when.

    This is the only O(layers) work per step, so it is written for speed: one pass, local names, no
    per-layer allocation. Non-finite values never get here (they are `nonfinite` events first).
    """
    names = state["layers"]
    if list(norms) != names:
        _realign_layers(state, norms)
        names = state["layers"]
    try:
        xs: list[float | None] = list(map(_log, norms.values()))
    except (TypeError, ValueError):  # a missing (None) or zero norm somewhere: it is skipped this step
        xs = [_log(v) if v is not None and v > 0.0 else None for v in norms.values()]
    n = state["ly_n"]
    state["ly_n"] = n + 1
    mus = state["ly_mu"]
    if n == 0:
        for i, x in enumerate(xs):
            if x is not None:
                mus[i] = x
        return
    devs = state["ly_dev"]
    out = state["out"]
    floor = cfg.band_dev_floor
    clip = cfg.band_clip
    warm = n >= cfg.warmup_steps
    a = cfg.band_alpha if warm else max(cfg.band_alpha, 1.0 / (n + 1))
    lz = cfg.layer_z if warm else math.inf
    i = -1
    for x in xs:
        i += 1
        if x is None:
            continue
        dv = devs[i]
        s = dv if dv > floor else floor
        d = x - mus[i]
        if d > lz * s:
            if names[i] not in out:
                out[names[i]] = step
        elif out and names[i] in out:
            del out[names[i]]
        lim = clip * s
        if d > lim:
            d = lim
        elif d < -lim:
            d = -lim
        mus[i] += a * d
        devs[i] = dv + a * ((d if d >= 0.0 else -d) - dv)


def _realign_layers(state: dict[str, Any], norms: Mapping[str, Any]) -> None:
    """The set or order of layers changed: keep the bands of layers still present, start new ones fresh."""
    old = dict(zip(state["layers"], zip(state["ly_mu"], state["ly_dev"], strict=True), strict=True))
    names = list(norms)
    state["layers"] = names
    fresh = (0.0, 0.0)
    if not old:
        state["ly_mu"] = [0.0] * len(names)
        state["ly_dev"] = [0.0] * len(names)
        state["ly_n"] = 0
        return
    state["ly_mu"] = [old.get(k, fresh)[0] for k in names]
    state["ly_dev"] = [old.get(k, fresh)[1] for k in names]
    state["out"] = {k: s for k, s in state["out"].items() if k in old and k in norms}


def advance(state: dict[str, Any], step: Mapping[str, Any],
            config: DetectorConfig | None = None) -> tuple[dict[str, Any], list[Event]]:
    """Feed one optimizer step to the detectors; returns the (same, updated) state and the events it raised.

    `step` has the trace step-line keys (see docs/detection.md); missing values are simply not judged. A
    step with `skipped` true (AMP's GradScaler dropped it for inf/NaN gradients) is counted but neither
    alerts nor teaches the bands anything: the scaler already handled it.
    """
    cfg = config if config is not None else _DEFAULT
    if state.get("v") != STATE_VERSION:
        state = _upgraded(state)
    t = int(step["step"])
    state["steps"] += 1
    state["last_step"] = t
    if step.get("skipped"):
        return state, []

    events: list[Event] = []
    loss = step.get("loss")
    g = step.get("grad_norm")
    u = step.get("update_norm")
    lgn = step.get("layer_grad_norms")
    lwn = step.get("layer_weight_norms")
    lun = step.get("layer_update_norms")

    # ---- nonfinite: critical at once, and nothing non-finite is ever learned from
    bad_layer = _nonfinite_layer(lgn, lwn, lun)
    bad = []
    if loss is not None and not _isfinite(loss):
        bad.append(("loss", loss))
    if g is not None and not _isfinite(g):
        bad.append(("grad_norm", g))
    if u is not None and not _isfinite(u):
        bad.append(("update_norm", u))
    if bad or bad_layer is not None:
        layer = bad_layer if bad_layer is not None else _root_cause(state, lgn, cfg)
        what, value = bad[0] if bad else ("layer norm", math.nan)
        if bad_layer is not None and lgn and bad_layer in lgn and lgn[bad_layer] is not None:
            value = float(lgn[bad_layer])
        where = f" (first in layer {layer})" if layer else ""
        events.append(Event("nonfinite", CRITICAL, t, float(value), None, layer,
                            f"{what} is {encode_value(float(value))} at step {t}{where}"))
        return state, events

    # ---- per-layer bands, for the root cause of whatever fires below
    if lgn:
        _track_layers(state, lgn, t, cfg)

    # ---- grad norm: spike (warning) and sustained growth (critical)
    if g is not None and g > 0.0:
        x = _log(g)
        n = state["g_n"]
        mu = state["g_mu"]
        dev = state["g_dev"]
        if n >= cfg.warmup_steps:
            s = dev if dev > cfg.band_dev_floor else cfg.band_dev_floor
            z = (x - mu) / s
            # growth: consecutive steps above the band frozen at the run's start
            if state["gr_n"]:
                if x > state["gr_base"] + cfg.growth_z * state["gr_dev"]:
                    state["gr_n"] += 1
                else:
                    state["gr_n"] = 0
            elif z > cfg.growth_z:
                state["gr_n"] = 1
                state["gr_base"] = mu
                state["gr_dev"] = s
            # network-wide: most layers out of their own bands at once, step after step
            n_layers = len(state["layers"])
            if (n_layers >= cfg.growth_layer_min_layers and len(state["out"]) >= cfg.growth_layer_share * n_layers
                    and x - mu >= _log(cfg.growth_layer_min_factor)):
                state["gw_n"] += 1
            else:
                state["gw_n"] = 0
            if state["gr_n"] >= cfg.growth_steps and x - state["gr_base"] >= _log(cfg.growth_min_factor):
                base = math.exp(state["gr_base"])
                events.append(Event("grad_growth", CRITICAL, t, float(g), base, _root_cause(state, lgn, cfg),
                                    f"grad norm {g:.4g} has grown {g / base:.3g}x over "
                                    f"{state['gr_n']} steps (band {base:.4g})"))
            elif state["gw_n"] >= cfg.growth_layer_steps:
                base = math.exp(mu)
                events.append(Event("grad_growth", CRITICAL, t, float(g), base, _root_cause(state, lgn, cfg),
                                    f"{len(state['out'])} of {n_layers} layers above their bands for "
                                    f"{state['gw_n']} steps; grad norm {g:.4g} is {g / base:.3g}x its band"))
            elif z > cfg.spike_z and x - mu >= _log(cfg.spike_min_factor):
                base = math.exp(mu)
                events.append(Event("grad_spike", WARNING, t, float(g), base, _root_cause(state, lgn, cfg),
                                    f"grad norm {g:.4g} is {g / base:.3g}x its band {base:.4g}"))
        _band_learn(state, _GRAD_BAND, x, cfg)

    # ---- loss divergence: the smoothed loss stays well above the run's early level
    if loss is not None and loss > 0.0:
        x = _log(loss)
        n = state["l_n"]
        if n == 0:
            state["l_first"] = x
            state["l_ewm"] = x
            state["l_slow"] = x
        else:
            state["l_ewm"] += cfg.loss_alpha * (x - state["l_ewm"])
            state["l_slow"] += cfg.loss_giveback_alpha * (x - state["l_slow"])
        if n < cfg.loss_start_steps:
            state["l_sum"] += x
            state["l_start"] = min(state["l_first"], state["l_sum"] / (n + 1))
        state["l_n"] = n + 1
        limit = state["l_start"] + _log(cfg.loss_factor)
        if n >= cfg.loss_start_steps and state["l_ewm"] > limit:
            state["l_run"] += 1
            if state["l_run"] == cfg.loss_steps:
                base = math.exp(limit)
                events.append(Event("loss_divergence", CRITICAL, t, float(loss), base, _root_cause(state, lgn, cfg),
                                    f"smoothed loss {math.exp(state['l_ewm']):.4g} has stayed above "
                                    f"{base:.4g} ({cfg.loss_factor:g}x its early level) for "
                                    f"{cfg.loss_steps} steps"))
        else:
            state["l_run"] = 0
        # give-back: the loss climbed most of the way back from its best level to where it started
        if n >= cfg.warmup_steps:
            slow = state["l_slow"]
            best = slow if n == cfg.warmup_steps or slow < state["l_best"] else state["l_best"]
            state["l_best"] = best
            progress = state["l_start"] - best
            if (progress >= _log(cfg.loss_giveback_min_progress)
                    and slow - best >= cfg.loss_giveback_share * progress):
                state["lb_run"] += 1
                if state["lb_run"] == cfg.loss_steps:
                    level = math.exp(best + cfg.loss_giveback_share * progress)
                    events.append(Event("loss_divergence", CRITICAL, t, float(loss), level,
                                        _root_cause(state, lgn, cfg),
                                        f"smoothed loss {math.exp(slow):.4g} has given back "
                                        f"{(slow - best) / progress:.0%} of its progress (start "
                                        f"{math.exp(state['l_start']):.4g}, best {math.exp(best):.4g}) "
                                        f"for {cfg.loss_steps} steps"))
            else:
                state["lb_run"] = 0

    # ---- update ratio: how far this step moved the weights, relative to their size
    if u is not None and lwn:
        try:
            w = math.hypot(*lwn.values())
        except TypeError:  # a None among the values
            w = math.hypot(*[v for v in lwn.values() if v is not None])
        ratio = u / w if 0.0 < w < math.inf else 0.0
        if 0.0 < ratio < math.inf:  # a quotient of finite norms can still underflow or overflow
            x = _log(ratio)
            n = state["r_n"]
            mu = state["r_mu"]
            dev = state["r_dev"]
            state["r_big"] = state["r_big"] + 1 if ratio >= cfg.ratio_sustained else 0
            if n < cfg.warmup_steps and state["r_big"] >= cfg.ratio_sustained_steps:
                events.append(Event("update_ratio", CRITICAL, t, ratio, cfg.ratio_sustained,
                                    _ratio_cause(state, lun, lwn, lgn, cfg),
                                    f"{state['r_big']} updates in a row at least {cfg.ratio_sustained:g}x the "
                                    f"weight norm (now {ratio:.3g}x)"))
            elif n < cfg.warmup_steps:
                lr = step.get("lr")
                plain = (n == 0 and lr is not None and g is not None and lr > 0.0 and g > 0.0
                         and u <= _PLAIN_STEP_TOLERANCE * lr * g)
                if plain and ratio >= cfg.ratio_gradient_step:
                    events.append(Event("update_ratio", CRITICAL, t, ratio, cfg.ratio_gradient_step,
                                        _ratio_cause(state, lun, lwn, lgn, cfg),
                                        f"the first update, a plain gradient step (lr x gradient), moved the "
                                        f"weights by {ratio:.3g}x their norm (limit {cfg.ratio_gradient_step:g}x)"))
                elif ratio >= cfg.ratio_critical:
                    events.append(Event("update_ratio", CRITICAL, t, ratio, cfg.ratio_critical,
                                        _ratio_cause(state, lun, lwn, lgn, cfg),
                                        f"update norm is {ratio:.3g}x the weight norm at step {t}, "
                                        f"before the run has a history (limit {cfg.ratio_critical:g}x)"))
            else:
                s = dev if dev > cfg.band_dev_floor else cfg.band_dev_floor
                if (x - mu) / s > cfg.ratio_z and x - mu >= _log(cfg.ratio_min_factor):
                    base = math.exp(mu)
                    events.append(Event("update_ratio", WARNING, t, ratio, base,
                                        _ratio_cause(state, lun, lwn, lgn, cfg),
                                        f"update/weight ratio {ratio:.3g} is {ratio / base:.3g}x "
                                        f"its band {base:.3g}"))
            _band_learn(state, _RATIO_BAND, x, cfg)

    return state, events


def _ratio_cause(state: dict[str, Any], lun: Mapping[str, Any] | None, lwn: Mapping[str, Any],
                 lgn: Mapping[str, Any] | None, cfg: DetectorConfig) -> str | None:
    """The layer to blame for an outsized update: the one whose own update is largest relative to its weights
    when the client sends per-layer updates; else the usual root cause; else (the first steps, no bands yet)
    the layer with the largest gradient relative to its weights, which is what plain SGD's update follows."""
    if lun:
        return _largest_ratio(lun, lwn)
    return _root_cause(state, lgn, cfg) or (_largest_ratio(lgn, lwn) if lgn else None)


def _largest_ratio(numerators: Mapping[str, Any], weights: Mapping[str, Any]) -> str | None:
    best = None
    best_ratio = 0.0
    for name, m in numerators.items():
        wn = weights.get(name)
        if m is None or not wn:
            continue
        r = m / wn
        if r > best_ratio:
            best, best_ratio = name, r
    return best


_DEFAULT = DetectorConfig()


# --------------------------------------------------------------------------------------------- incidents

_SEVERITY_RANK = {WARNING: 1, CRITICAL: 2}


def new_incident_state() -> dict[str, Any]:
    """Incident bookkeeping for a run with nothing open: signature -> open incident."""
    return {"open": {}}


def track_incidents(incident_state: dict[str, Any], events: list[Event], step: int,
                    config: DetectorConfig | None = None
                    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Turn a step's events into incident changes: what an on-call person should hear about.

    One incident per signature stays open while its signature keeps firing; it resolves once the signature
    has been quiet for `resolve_after_steps` steps, so a flapping signal is one incident, not many. Returns
    the (updated in place) incident state, the incidents opened at this step (a warning incident that turns
    critical is reported again, with "escalated": true) and those resolved at this step. Incidents are plain
    JSON-safe dicts: signature, severity, opened_at, last_seen, layer, value, baseline, message
    (+ resolved_at once resolved).
    """
    open_ = incident_state["open"]
    if not events and not open_:  # the common case: a quiet step with nothing open
        return incident_state, [], []
    cfg = config if config is not None else _DEFAULT
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
    fired = {ev.signature for ev in events}
    quiet = [s for s, inc in open_.items()
             if s not in fired and step - inc["last_seen"] >= cfg.resolve_after_steps]
    for sig in quiet:
        inc = open_.pop(sig)
        inc["resolved_at"] = step
        resolved.append(inc)
    return incident_state, opened, resolved
