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
crosses (non-finite values, updates as large as the weights before a run has a history). A signature that
fired is held until its signal is back near the baseline it broke, and refires meanwhile, so that its incident
(`gradwatch.incidents` turns events into incidents) stays open while the run is still broken.

Cost: a few microseconds per step with 50 layers. Per step, the per-layer work is three C-level passes (the
product of the layer grad norms for their geometric mean, one comparison of every layer with its breakout
limit, the weight norm); the per-layer bands themselves are taught every `layer_every` steps.
docs/detection.md explains each signature, its settings and how well it does on the labelled traces.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress
from operator import gt as _gt
from typing import Any, ClassVar

from gradwatch.incidents import RESOLVE_AFTER_STEPS
from gradwatch.wire import encode_value

__all__ = [
    "SIGNATURES",
    "DetectorConfig",
    "Event",
    "advance",
    "held_signatures",
    "new_state",
]

SIGNATURES = ("nonfinite", "grad_spike", "grad_growth", "loss_divergence", "update_ratio")
WARNING = "warning"
CRITICAL = "critical"
STATE_VERSION = 3

_log = math.log
_exp = math.exp
_prod = math.prod
_hypot = math.hypot
_isfinite = math.isfinite
_INF = math.inf
_PLAIN_STEP_TOLERANCE = 1.05  # weight decay adds a little to a plain gradient step
_NO_LIMIT = sys.float_info.max  # a breakout limit no finite norm exceeds (JSON cannot hold infinity)
_LOG_NO_LIMIT = _log(_NO_LIMIT)


@dataclass(frozen=True)
class DetectorConfig:
    """Every threshold the detectors use. The defaults are the one configuration docs/detection.md scores.

    Bands are exponentially weighted in log space; a factor of 10 in a norm is log(10) = 2.3 log units.
    """

    # --- robust bands (grad norm, update ratio, geometric mean of the layer grad norms)
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
    growth_layer_min_factor: float = 3.0
    """Growth, too, when the whole network climbs together: both the total grad norm and the geometric mean
    of the layer grad norms are at least this many times their bands ..."""
    growth_layer_z: float = 5.0
    """... the geometric mean also this many of its band's deviations above it ..."""
    growth_layer_steps: int = 2
    """... for this many consecutive steps. A spike in one layer lifts the total but barely moves the
    geometric mean (every layer weighs the same in it, whatever its size)."""
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
    polyak_limit: float = 4.0
    """Critical, too, when that plain first step overshoots: update norm x grad norm / loss, the step in units
    of the Polyak step loss / grad norm, is at least this. Along the gradient of a quadratic whose minimum is
    0 this is 2 x lr x curvature, and above 4 (lr x curvature > 2) the loss must rise. Set 0 to turn off."""
    polyak_min_ratio: float = 0.1
    """... provided the step also moves the weights by at least this share of their norm (a large Polyak
    multiple on a tiny step is a loss near its floor, not an overshoot)."""

    # --- per-layer bands (root cause)
    layer_z: float = 3.0
    """A layer's grad norm this many deviations above its own band has broken out (root-cause bookkeeping)."""
    layer_every: int = 32
    """The per-layer bands learn one step in this many (every step during the first `warmup_steps`); every
    step is still compared with each layer's breakout limit."""
    layer_alpha: float = 0.25
    """Weight of a new sample in a per-layer band (one every `layer_every` steps: a memory of about 130 steps)."""

    # --- incidents
    resolve_z: float = 3.5
    """After a grad_growth, grad_spike or update_ratio warning the signal is back near the baseline it broke once
    it is within this many of that band's deviations (held at the step it broke out; `_hold`)."""
    resolve_after_steps: int = RESOLVE_AFTER_STEPS
    """An incident resolves once its signature has been quiet for this many steps (hysteresis;
    `gradwatch.incidents`)."""

    # the logs of the factors above, worked out once: `advance` compares log-space distances with them
    _up_layers: ClassVar[float]
    _up_growth: ClassVar[float]
    _up_spike: ClassVar[float]
    _up_loss: ClassVar[float]
    _up_progress: ClassVar[float]
    _up_ratio: ClassVar[float]
    _band: ClassVar[tuple[int, float, float, float]]  # what `_band_update` reads, in one attribute

    def __post_init__(self) -> None:
        for attr, factor in (("_up_layers", self.growth_layer_min_factor), ("_up_growth", self.growth_min_factor),
                             ("_up_spike", self.spike_min_factor), ("_up_loss", self.loss_factor),
                             ("_up_progress", self.loss_giveback_min_progress),
                             ("_up_ratio", self.ratio_min_factor)):
            ok = isinstance(factor, (int, float)) and factor > 0
            object.__setattr__(self, attr, _log(factor) if ok else -_INF)  # a factor <= 0: any level will do
        object.__setattr__(self, "_band", (self.warmup_steps, self.band_dev_floor, self.band_clip, self.band_alpha))


@dataclass
class Event:
    """One detector finding at one step. `baseline` is the band value or limit the measurement broke.

    Values stay floats (NaN and infinities included): spelling them for JSON is the job of whoever writes them
    out (`gradwatch.wire.encode_value`)."""

    signature: str
    severity: str
    step: int
    value: float | None
    baseline: float | None
    layer: str | None
    message: str


def held_signatures(state: dict[str, Any]) -> Collection[str]:
    """The signatures fired and not yet back near the baseline they broke (`_hold`): their incidents stay open
    (`gradwatch.incidents.track_incidents(..., held=...)`)."""
    held: dict[str, Any] = state["held"]
    return held  # its keys; the live dict itself, which costs nothing to hand over


def new_state() -> dict[str, Any]:
    """Detector state for a run that has not sent a step yet."""
    return {
        "v": STATE_VERSION,
        "steps": 0,  # steps seen (skipped ones included)
        "last_step": None,
        # grad norm band (log space)
        "g_n": 0, "g_mu": 0.0, "g_dev": 0.0, "g_warm": [],
        # grad growth: consecutive steps above the band held when the climb started (gr_*), and
        # consecutive steps with the whole network far above its bands (gw_n)
        "gr_n": 0, "gr_base": 0.0, "gr_dev": 0.0, "gw_n": 0,
        # band of the log geometric mean of the layer grad norms (the network-wide growth test)
        "m_n": 0, "m_mu": 0.0, "m_dev": 0.0, "m_warm": [],
        # loss: early baseline, smoothed log loss, consecutive divergent steps
        "l_n": 0, "l_first": 0.0, "l_sum": 0.0, "l_start": 0.0, "l_ewm": 0.0, "l_run": 0,
        # loss give-back: slow smoothed log loss, its best level, consecutive steps past the share
        "l_slow": 0.0, "l_best": 0.0, "lb_run": 0,
        # update ratio band (log of update norm / weight norm)
        "r_n": 0, "r_mu": 0.0, "r_dev": 0.0, "r_warm": [], "r_big": 0,
        # per-layer grad norm bands, aligned with "layers": log mean (None until a layer's first sample),
        # deviation, breakout limit as a plain norm; layers still warming up their band -> samples so far
        # (every layer at the start)
        "layers": [], "ly_mu": [], "ly_dev": [], "ly_lim": [], "ly_young": {},
        # layers now above their breakout limit: name -> first step out (the root-cause candidates)
        "out": {},
        # critical signatures whose signal has not come back yet (`_hold`): signature -> the log level it must
        # come back under, the baseline it broke, the step it broke out, the smoothed series judged (loss)
        "held": {},
    }


def _upgraded(state: dict[str, Any], cfg: DetectorConfig) -> dict[str, Any]:
    """A state stored by another version of this module, with whatever it lacks taken from a fresh state.

    The service keeps states in its database across upgrades; a new detector starts from scratch only on the
    parts it did not have before. Version 1 taught every layer's band every step and had no breakout limits:
    its bands are kept and the limits derived from them. Version 2 held nothing (`_hold`): nothing is held.
    """
    fresh = new_state()
    fresh.update({k: v for k, v in state.items() if k in fresh and k != "v"})
    names, mus, devs = fresh["layers"], fresh["ly_mu"], fresh["ly_dev"]
    if not (isinstance(names, list) and isinstance(mus, list) and isinstance(devs, list)
            and len(names) == len(mus) == len(devs)):
        names = fresh["layers"] = []
        mus = fresh["ly_mu"] = []
        devs = fresh["ly_dev"] = []
        fresh["out"] = {}
    if len(fresh["ly_lim"]) != len(names):
        if int(state.get("ly_n", 0)) >= cfg.warmup_steps:  # version 1 counted the samples its bands had
            fresh["ly_young"] = {}
            floor, z = cfg.band_dev_floor, cfg.layer_z
            fresh["ly_lim"] = [_limit(mu, dev, floor, z) for mu, dev in zip(mus, devs, strict=True)]
        else:  # not warm yet: start the layer bands over
            fresh["ly_mu"] = [None] * len(names)
            fresh["ly_dev"] = [0.0] * len(names)
            fresh["ly_lim"] = [_NO_LIMIT] * len(names)
            fresh["ly_young"] = dict.fromkeys(names, 0)
            fresh["out"] = {}
    return fresh


def _limit(mu: float, dev: float, floor: float, z: float) -> float:
    e = mu + z * (dev if dev > floor else floor)
    return _exp(e) if e < _LOG_NO_LIMIT else _NO_LIMIT


_GRAD_BAND = ("g_n", "g_mu", "g_dev", "g_warm")
_RATIO_BAND = ("r_n", "r_mu", "r_dev", "r_warm")
_GMEAN_BAND = ("m_n", "m_mu", "m_dev", "m_warm")


def _band_update(state: dict[str, Any], keys: tuple[str, str, str, str], x: float, n: int, mu: float, dev: float,
                 cfg: DetectorConfig) -> None:
    """Teach a band one sample (log space): the one place a band (grad norm, update ratio, geometric mean of
    the layers) learns. `n`, `mu` and `dev` are the band's count, mean and deviation as they are in `state`
    (the signatures have read them already to judge the step).

    The first `warmup_steps` samples are kept and the band is their median and mean absolute deviation from
    it, so a wild first step (common: the untrained model) cannot skew the band for long. After that the
    band is an EWMA whose input is clipped to `band_clip` deviations, ZClip-style: one spike moves it
    a little, a lasting change of level moves it all the way within a few band memories.
    """
    if n < cfg.warmup_steps:
        _band_seed(state, keys, x, n, cfg.warmup_steps)
        return
    floor = cfg.band_dev_floor
    d = x - mu
    lim = cfg.band_clip * (dev if dev > floor else floor)
    if d > lim:
        d = lim
    elif d < -lim:
        d = -lim
    a = cfg.band_alpha
    state[keys[0]] = n + 1
    state[keys[1]] = mu + a * d
    state[keys[2]] = dev + a * ((d if d >= 0.0 else -d) - dev)


def _band_seed(state: dict[str, Any], keys: tuple[str, str, str, str], x: float, n: int, warmup: int) -> None:
    """`_band_update` during a band's first `warmup` samples: the median and mean absolute deviation of the
    samples so far (kept in the band's warm-up list until then)."""
    kn, kmu, kdev, kwarm = keys
    state[kn] = n + 1
    warm = state[kwarm]
    warm.append(x)
    ordered = sorted(warm)
    k = len(ordered)
    mid = ordered[k // 2] if k % 2 else 0.5 * (ordered[k // 2 - 1] + ordered[k // 2])
    state[kmu] = mid
    state[kdev] = sum(abs(v - mid) for v in ordered) / k
    if n + 1 == warmup:
        warm.clear()


def _first_nonfinite(names: Sequence[str], values: Any) -> tuple[str | None, float]:
    """The first layer (in the step's order) with a non-finite norm and its value; (None, nan) if none."""
    for name, v in zip(names, values, strict=False):
        if v is not None and not _isfinite(v):
            return name, float(v)
    return None, math.nan


def _all_finite(values: Any) -> bool:
    """A sum is finite only if every term is (or it overflowed, which the caller then checks one by one)."""
    try:
        return _isfinite(sum(values))
    except TypeError:  # a None among the values
        return _isfinite(sum(v for v in values if v is not None))


def _as_map(keys: Sequence[str] | None, values: Any) -> dict[str, Any] | None:
    return dict(zip(keys, values, strict=False)) if keys is not None and values is not None else None


def _root_cause(state: dict[str, Any], step: Mapping[str, Any], cfg: DetectorConfig) -> str | None:
    """The layer to blame: the one that broke out of its own band first and is still out; failing that (every
    layer is noisy enough to stay inside its band), the layer furthest above its band right now (the step's
    layer grad norms). Only called when an event fires, so the O(layers) fallback costs nothing on quiet
    steps, and the signatures need not carry the layer norms for it."""
    out: dict[str, int] = state["out"]
    if out:
        return min(out.items(), key=lambda kv: (kv[1], kv[0]))[0]
    keys, values = _grad_view(step, _names(step))
    if values is None or keys is None or list(keys) != state["layers"]:
        return None
    floor = cfg.band_dev_floor
    best, best_z = None, 0.0
    young = state["ly_young"]
    for name, v, mu, dev in zip(state["layers"], values, state["ly_mu"], state["ly_dev"], strict=True):
        if mu is None or v is None or not v > 0.0 or not _isfinite(v) or young.get(name, 2) < 2:
            continue
        z = (_log(v) - mu) / (dev if dev > floor else floor)
        if z > best_z:
            best, best_z = name, z
    return best


def _track_breakouts(state: dict[str, Any], held: dict[str, Any], steps: int, t: int, names: list[str] | None,
                     gk: Sequence[str] | None, gv: Any, gprod: float | None, cfg: DetectorConfig) -> float | None:
    """Root-cause bookkeeping: which layers are above their breakout limits now, and since when (one C-level
    pass over plain norms; Python touches a layer only while it is out), and the per-layer bands' lesson when
    due. Returns the log geometric mean of the layer grad norms for the network-wide growth test (None with
    too few layers, or a dead one)."""
    layers = state["layers"]
    if gk != layers:
        _realign_layers(state, gk)  # type: ignore[arg-type]
        layers = state["layers"]
    elif gk is names and layers[0] is not gk[0]:  # type: ignore[index]
        # the same names as other string objects (the state came back from JSON): share the caller's, so
        # that the comparison above costs a pointer per layer from the next step on
        layers = state["layers"] = list(gk)  # type: ignore[arg-type]
    lims = state["ly_lim"]
    try:
        now_out = list(compress(layers, map(_gt, gv, lims)))
    except TypeError:  # a missing (None) norm somewhere: that layer is not judged this step
        now_out = [k for k, v, lim in zip(layers, gv, lims, strict=True) if v is not None and v > lim]
    out = state["out"]
    if (now_out or out) and now_out != list(out):
        state["out"] = {k: out.get(k, t) for k in now_out}
    if held and "grad_growth" in held:
        pass  # the grad norms are out: the layer bands learn nothing from them
    elif steps % cfg.layer_every == 0:
        _learn_layers(state, gv, cfg, True)
    elif state["ly_young"]:
        _learn_layers(state, gv, cfg, False)
    n_layers = len(layers)
    if n_layers < cfg.growth_layer_min_layers or gprod is None:
        return None
    if 0.0 < gprod < _INF:
        return _log(gprod) / n_layers
    try:  # the product under- or overflowed: add the logs instead
        return sum(map(_log, gv)) / n_layers
    except ValueError:  # a zero norm (a dead layer)
        return None


def _learn_layers(state: dict[str, Any], values: Any, cfg: DetectorConfig, due: bool) -> None:
    """Teach every layer's band one sample (log space, clipped like `_band_update`'s) and renew its limit.

    A layer's band starts at its first sample and learns every step, with weight 1/samples, until it has
    `warmup_steps` samples; until then it has no limit (it cannot break out). The others learn when `due`
    (every `layer_every` steps).
    """
    try:
        xs: list[float | None] = list(map(_log, values))
    except (TypeError, ValueError):  # a missing (None) or zero norm somewhere: that layer learns nothing
        xs = [_log(v) if v is not None and v > 0.0 else None for v in values]
    mus = state["ly_mu"]
    devs = state["ly_dev"]
    lims = state["ly_lim"]
    young = state["ly_young"]
    floor = cfg.band_dev_floor
    clip = cfg.band_clip
    z = cfg.layer_z
    a = cfg.layer_alpha
    if young:
        names = state["layers"]
        warm = cfg.warmup_steps
        for i, x in enumerate(xs):
            if x is None:
                continue
            k = young.get(names[i])
            if k is None and not due:
                continue
            if k is not None:
                if k + 1 >= warm:
                    del young[names[i]]
                else:
                    young[names[i]] = k + 1
                if k == 0 or mus[i] is None:
                    mus[i] = x
                    devs[i] = 0.0
                    lims[i] = _NO_LIMIT
                    continue
            _learn_one(mus, devs, i, x, a if k is None else max(a, 1.0 / (k + 1)), floor, clip)
            lims[i] = _limit(mus[i], devs[i], floor, z) if names[i] not in young else _NO_LIMIT
        return
    clip_floor = clip * floor
    z_floor = z * floor
    i = -1
    for x in xs:
        i += 1
        if x is None:
            continue
        mu = mus[i]
        dv = devs[i]
        lim = clip * dv if dv > floor else clip_floor
        d = x - mu
        if d > lim:
            d = lim
        elif d < -lim:
            d = -lim
        mu += a * d
        if d < 0.0:
            d = -d
        dv += a * (d - dv)
        mus[i] = mu
        devs[i] = dv
        e = mu + (z * dv if dv > floor else z_floor)
        lims[i] = _exp(e) if e < _LOG_NO_LIMIT else _NO_LIMIT


def _learn_one(mus: list[Any], devs: list[float], i: int, x: float, a: float, floor: float, clip: float) -> None:
    mu = mus[i]
    dv = devs[i]
    d = x - mu
    lim = clip * (dv if dv > floor else floor)
    if d > lim:
        d = lim
    elif d < -lim:
        d = -lim
    mus[i] = mu + a * d
    devs[i] = dv + a * ((d if d >= 0.0 else -d) - dv)


def _realign_layers(state: dict[str, Any], keys: Sequence[str]) -> None:
    """The set or order of layers changed: keep the bands of layers still present, start new ones fresh.

    The geometric mean of a different set of layers is a different quantity: its band starts over."""
    old = {name: (mu, dev, lim) for name, mu, dev, lim in
           zip(state["layers"], state["ly_mu"], state["ly_dev"], state["ly_lim"], strict=True)}
    names = list(keys)
    fresh = (None, 0.0, _NO_LIMIT)
    bands = [old.get(k, fresh) for k in names]
    state["layers"] = names
    state["ly_mu"] = [b[0] for b in bands]
    state["ly_dev"] = [b[1] for b in bands]
    state["ly_lim"] = [b[2] for b in bands]
    young = {k: n for k, n in state["ly_young"].items() if k in old}
    young.update((k, 0) for k in names if k not in old)
    state["ly_young"] = {k: young[k] for k in names if k in young}
    state["out"] = {k: s for k, s in state["out"].items() if k in old and k in young or k in names}
    if old:
        state["m_n"], state["m_mu"], state["m_dev"], state["m_warm"] = 0, 0.0, 0.0, []


def _layer_view(m: Any, names: Sequence[str] | None) -> tuple[Sequence[str] | None, Any]:
    """(layer names, values in the same order) of a step's per-layer field: a mapping name -> value, or (with
    the step's `layer_names`) a sequence of values aligned with the names."""
    if not m:
        return None, None
    if names is None or isinstance(m, Mapping):
        return list(m), m.values()
    if len(m) == len(names):
        return names, m
    d = dict(zip(names, m, strict=False))  # fewer values than names, or more: pair them off as far as they go
    return list(d), list(d.values())


def advance(state: dict[str, Any], step: Mapping[str, Any],
            config: DetectorConfig | None = None) -> tuple[dict[str, Any], list[Event]]:
    """Feed one optimizer step to the detectors; returns the (same, updated) state and the events it raised.

    `step` has the trace step-line keys (see docs/detection.md); missing values are simply not judged. The
    per-layer fields are mappings name -> norm, or sequences of norms aligned with the step's `layer_names`
    (what the service stores; saves building a dict per step). A step with `skipped` true (AMP's GradScaler
    dropped it for inf/NaN gradients) is counted but neither alerts nor teaches the bands anything: the
    scaler already handled it.
    """
    cfg = config if config is not None else _DEFAULT
    if state.get("v") != STATE_VERSION:
        state = _upgraded(state, cfg)
    get = step.get
    t = step["step"]
    if type(t) is not int:
        t = int(t)
    steps = state["steps"] = state["steps"] + 1
    state["last_step"] = t
    if get("skipped"):
        return state, []
    loss = get("loss")
    g = get("grad_norm")
    u = get("update_norm")
    names, gk, gv, gprod, w, layers_finite = _layer_inputs(step)
    if not layers_finite or not _isfinite((loss or 0.0) + (g or 0.0) + (u or 0.0)):
        bad = _nonfinite(state, t, loss, g, u, w, gprod, names, gk, gv, step, cfg)
        if bad is not None:
            events = [bad]
            for signature in list(state["held"]):  # a non-finite step is not back near any baseline
                _still_out(state, events, signature, math.nan, None, f"{signature} at a non-finite step", step, cfg)
            return state, events

    events = []
    held = state["held"]  # (empty on most steps: `held and ...` skips the lookups)
    gm = _track_breakouts(state, held, steps, t, names, gk, gv, gprod, cfg) if gv is not None else None
    if g is not None and g > 0.0:
        x = _log(g)
        n, mu, dev = state["g_n"], state["g_mu"], state["g_dev"]
        warm = n >= cfg.warmup_steps
        if held and "grad_growth" in held:
            _still_out(state, events, "grad_growth", x, g, f"grad norm {g:.4g}", step, cfg)
        elif warm:
            _grad_growth(state, events, step, x, mu, dev, gm, cfg)
        if held and "grad_spike" in held:
            _still_out(state, events, "grad_spike", x, g, f"grad norm {g:.4g}", step, cfg)
        elif warm and x - mu >= cfg._up_spike and "grad_growth" not in held:  # (most steps are not)
            _grad_spike(state, events, step, x, mu, dev, cfg)
        if not held or "grad_growth" not in held:
            _band_update(state, _GRAD_BAND, x, n, mu, dev, cfg)
    if gm is not None and (not held or "grad_growth" not in held):
        _band_update(state, _GMEAN_BAND, gm, state["m_n"], state["m_mu"], state["m_dev"], cfg)
    if loss is not None and loss > 0.0:
        _loss_divergence(state, events, held, step, loss, cfg)
    if u is not None and w is not None:
        _update_ratio(state, events, held, step, u, w, cfg)
    return state, events


def _names(step: Mapping[str, Any]) -> list[str] | None:
    """The step's `layer_names` as a list (the names of per-layer values sent as sequences), or None."""
    names = step.get("layer_names")
    return list(names) if names is not None and type(names) is not list else names


def _grad_view(step: Mapping[str, Any], names: list[str] | None) -> tuple[Sequence[str] | None, Any]:
    """(layer names, grad norms in the same order) of the step's layer grad norms, whichever form they came in."""
    lgn = step.get("layer_grad_norms")
    if names is not None and type(lgn) is list and len(lgn) == len(names):  # the service's form
        return names, lgn
    if type(lgn) is dict:  # replay's and the client's
        return (list(lgn), lgn.values()) if lgn else (None, None)
    return _layer_view(lgn, names)


def _layer_inputs(step: Mapping[str, Any]
                  ) -> tuple[list[str] | None, Sequence[str] | None, Any, float | None, float | None, bool]:
    """What the detectors read from a step's per-layer fields, whichever form they came in: (layer_names,
    the grad norms' layer names, the grad norms, their product, the L2 norm of the weights, whether every
    layer norm is certainly finite). The product (the geometric mean's) and the L2 norm are non-finite if any
    term is, so they also serve as the non-finite check's fast path."""
    names = step.get("layer_names")
    if names is not None and type(names) is not list:
        names = list(names)
    lgn = step.get("layer_grad_norms")
    gk: Sequence[str] | None
    gv: Any
    if names is not None and type(lgn) is list and len(lgn) == len(names):  # the service's form
        gk, gv = names, lgn
    elif type(lgn) is dict:  # replay's and the client's
        if lgn:
            gk, gv = list(lgn), lgn.values()
        else:
            gk = gv = None
    else:
        gk, gv = _layer_view(lgn, names)
    lwn = step.get("layer_weight_norms")
    wv: Any
    finite = True
    gprod = None
    if gv is not None:
        try:
            gprod = _prod(gv)
        except TypeError:  # a None among them
            gprod = None
        finite = gprod is not None and 0.0 < gprod < _INF
    w = None
    if lwn:
        if names is not None and type(lwn) is list and len(lwn) == len(names):
            wv = lwn
        else:
            wv = lwn.values() if type(lwn) is dict else _layer_view(lwn, names)[1]
        try:
            w = _hypot(*wv)
        except TypeError:  # a None among them
            w = _hypot(*[v for v in wv if v is not None])
        finite = finite and _isfinite(w)
    lun = step.get("layer_update_norms")
    if lun:
        finite = finite and _all_finite(lun.values() if isinstance(lun, Mapping) else lun)
    return names, gk, gv, gprod, w, finite


# ------------------------------------------------------------------------------------------- signatures


def _nonfinite(state: dict[str, Any], t: int, loss: float | None, g: float | None, u: float | None,
               w: float | None, gprod: float | None, names: list[str] | None, gk: Sequence[str] | None, gv: Any,
               step: Mapping[str, Any], cfg: DetectorConfig) -> Event | None:
    """`nonfinite`: any NaN or infinity among the step's values, critical at once (and the step teaches
    nothing). Names what went non-finite (the first of loss, grad norm, update norm, else a layer norm) and
    the layer to blame (the first non-finite one in the step's order, else the usual root cause)."""
    bad_layer: str | None = None
    bad_value = math.nan
    if gv is not None and (gprod is None or not 0.0 < gprod < _INF) and not _all_finite(gv):
        bad_layer, bad_value = _first_nonfinite(gk, gv)  # type: ignore[arg-type]
    if bad_layer is None and w is not None and not _isfinite(w):
        bad_layer = _first_nonfinite(*_layer_view(step.get("layer_weight_norms"), names))[0]  # type: ignore[arg-type]
    lun = step.get("layer_update_norms")
    if bad_layer is None and lun and not _all_finite(lun.values() if isinstance(lun, Mapping) else lun):
        bad_layer = _first_nonfinite(*_layer_view(lun, names))[0]  # type: ignore[arg-type]
    if (bad_layer is None and (loss is None or _isfinite(loss)) and (g is None or _isfinite(g))
            and (u is None or _isfinite(u))):
        return None
    bad = [(what, v) for what, v in (("loss", loss), ("grad_norm", g), ("update_norm", u))
           if v is not None and not _isfinite(v)]
    layer = bad_layer if bad_layer is not None else _root_cause(state, step, cfg)
    what, value = bad[0] if bad else ("layer norm", math.nan)
    if not bad and bad_layer is not None and not math.isnan(bad_value):  # a layer grad norm: report its value
        value = bad_value  # (only when it is what the message names: value and name from the same place)
    where = f" (first in layer {layer})" if layer else ""
    return Event("nonfinite", CRITICAL, t, float(value), None, layer,
                 f"{what} is {encode_value(float(value))} at step {t}{where}")


def _grad_growth(state: dict[str, Any], events: list[Event], step: Mapping[str, Any], x: float, mu: float,
                 dev: float, gm: float | None, cfg: DetectorConfig) -> None:
    """`grad_growth` (critical): the grad norm has climbed for `growth_steps` steps above the band held at the
    start of the climb (a band that chased an exponential would never see it), or the whole network (the
    total and the geometric mean of the layers) has stood far above its bands for `growth_layer_steps`.
    Keeps both counters on every step; when it fires it holds the signature (`_hold`). `x` is the log of the
    grad norm, `mu` and `dev` its band's."""
    floor = cfg.band_dev_floor
    s = dev if dev > floor else floor
    climb = state["gr_n"]
    if climb:
        climb = climb + 1 if x > state["gr_base"] + cfg.growth_z * state["gr_dev"] else 0
        state["gr_n"] = climb
    elif (x - mu) / s > cfg.growth_z:
        climb = state["gr_n"] = 1
        state["gr_base"] = mu
        state["gr_dev"] = s
    wide = state["gw_n"]
    if gm is not None and x - mu >= cfg._up_layers and state["m_n"] >= cfg.warmup_steps:
        dm = gm - state["m_mu"]
        md = state["m_dev"]
        wide = wide + 1 if dm >= cfg._up_layers and dm >= cfg.growth_layer_z * (md if md > floor else floor) else 0
        state["gw_n"] = wide
    elif wide:
        wide = state["gw_n"] = 0
    if climb >= cfg.growth_steps and x - state["gr_base"] >= cfg._up_growth:
        t, g = state["last_step"], step["grad_norm"]
        base = _exp(state["gr_base"])
        _hold(state, "grad_growth", CRITICAL, state["gr_base"] + cfg.resolve_z * state["gr_dev"], base, t)
        events.append(Event("grad_growth", CRITICAL, t, float(g), base, _root_cause(state, step, cfg),
                            f"grad norm {g:.4g} has grown {g / base:.3g}x over {state['gr_n']} steps "
                            f"(band {base:.4g})"))
        return
    if wide >= cfg.growth_layer_steps:
        t, g = state["last_step"], step["grad_norm"]
        base = _exp(mu)
        _hold(state, "grad_growth", CRITICAL, mu + cfg.resolve_z * s, base, t)
        events.append(Event("grad_growth", CRITICAL, t, float(g), base, _root_cause(state, step, cfg),
                            f"the whole network climbs: the geometric mean of the layer grad norms is "
                            f"{_exp(gm - state['m_mu']):.3g}x its band and the grad norm {g:.4g} "
                            f"{g / base:.3g}x its band, for {state['gw_n']} steps"))


def _grad_spike(state: dict[str, Any], events: list[Event], step: Mapping[str, Any], x: float, mu: float,
                dev: float, cfg: DetectorConfig) -> None:
    """`grad_spike` (warning): one grad norm far above its band, in deviations and as a factor. Healthy runs
    spike too, so this pages no one. Held (`_hold`) until the grad norm is back near the band it broke; the
    band itself keeps learning (a warning does not freeze it). `mu` and `dev` are the grad norm band's."""
    s = dev if dev > cfg.band_dev_floor else cfg.band_dev_floor
    if (x - mu) / s > cfg.spike_z and x - mu >= cfg._up_spike:
        t, g = state["last_step"], step["grad_norm"]
        base = _exp(mu)
        _hold(state, "grad_spike", WARNING, mu + cfg.resolve_z * s, base, t)
        events.append(Event("grad_spike", WARNING, t, float(g), base, _root_cause(state, step, cfg),
                            f"grad norm {g:.4g} is {g / base:.3g}x its band {base:.4g}"))


def _loss_divergence(state: dict[str, Any], events: list[Event], held: dict[str, Any], step: Mapping[str, Any],
                     loss: float, cfg: DetectorConfig) -> None:
    """`loss_divergence` (critical): the smoothed loss has stayed well above the run's early level, or a slow
    smoothed loss has given back most of the progress the run made, for `loss_steps` steps. Once it fires, the
    signature is held (`_hold`) until that smoothed loss is back under the level it broke."""
    x = _log(loss)
    n = state["l_n"]
    state["l_n"] = n + 1
    if n:
        ewm = state["l_ewm"]
        ewm += cfg.loss_alpha * (x - ewm)
        slow = state["l_slow"]
        slow += cfg.loss_giveback_alpha * (x - slow)
    else:
        ewm = slow = state["l_first"] = x
    state["l_ewm"] = ewm
    state["l_slow"] = slow
    if n < cfg.loss_start_steps:
        state["l_sum"] += x
        start = state["l_start"] = min(state["l_first"], state["l_sum"] / (n + 1))
    else:
        start = state["l_start"]
    if held and "loss_divergence" in held:
        level = state[held["loss_divergence"]["series"]]
        if _still_out(state, events, "loss_divergence", level, loss, f"smoothed loss {_exp(level):.4g}", step, cfg):
            return
    limit = start + cfg._up_loss
    if n >= cfg.loss_start_steps and ewm > limit:
        state["l_run"] += 1
        if state["l_run"] == cfg.loss_steps:
            t = state["last_step"]
            base = _exp(limit)
            _hold(state, "loss_divergence", CRITICAL, limit, base, t, "l_ewm")
            state["l_run"] = state["lb_run"] = 0  # after the hold, it takes `loss_steps` steps out again
            events.append(Event("loss_divergence", CRITICAL, t, float(loss), base, _root_cause(state, step, cfg),
                                f"smoothed loss {_exp(ewm):.4g} has stayed above {base:.4g} "
                                f"({cfg.loss_factor:g}x its early level) for {cfg.loss_steps} steps"))
    elif state["l_run"]:
        state["l_run"] = 0
    if n < cfg.warmup_steps:
        return
    best = state["l_best"]
    if slow < best or n == cfg.warmup_steps:
        best = state["l_best"] = slow
    progress = start - best
    if progress >= cfg._up_progress and slow - best >= cfg.loss_giveback_share * progress:
        state["lb_run"] += 1
        if state["lb_run"] == cfg.loss_steps:
            t = state["last_step"]
            level = _exp(best + cfg.loss_giveback_share * progress)
            _hold(state, "loss_divergence", CRITICAL, best + cfg.loss_giveback_share * progress, level, t, "l_slow")
            state["l_run"] = state["lb_run"] = 0
            events.append(Event("loss_divergence", CRITICAL, t, float(loss), level, _root_cause(state, step, cfg),
                                f"smoothed loss {_exp(slow):.4g} has given back {(slow - best) / progress:.0%} of "
                                f"its progress (start {_exp(state['l_start']):.4g}, best {_exp(best):.4g}) "
                                f"for {cfg.loss_steps} steps"))
    elif state["lb_run"]:
        state["lb_run"] = 0


def _hold(state: dict[str, Any], signature: str, severity: str, limit: float, baseline: float, t: int,
          series: str | None = None) -> None:
    """Hold a signature that fired until its signal is back under `limit` (log space): near the baseline the
    run had when it broke out, not near a band that went on to learn the explosion. Each judged step that is
    still out fires the signature again, so its incident stays open (it resolves `resolve_after_steps` after
    the signal came back); a run that ends out, or goes non-finite, leaves it open. While a critical
    signature is held, its signal's bands learn nothing."""
    state["held"][signature] = {"severity": severity, "limit": limit, "baseline": baseline, "since": t,
                                "series": series}


def _still_out(state: dict[str, Any], events: list[Event], signature: str, x: float, value: float | None,
               what: str, step: Mapping[str, Any], cfg: DetectorConfig) -> bool:
    """A held signature's step: True, and the signature fires again, while `x` (the log of the signal; NaN for
    a non-finite step) is not back under the level it broke; else the hold ends and the step is judged as
    usual."""
    held = state["held"][signature]
    if x <= held["limit"]:
        del state["held"][signature]
        return False
    events.append(Event(signature, held["severity"], state["last_step"], None if value is None else float(value),
                        held["baseline"], _root_cause(state, step, cfg),
                        f"{what} is still above {_exp(held['limit']):.4g}, the level it broke at step "
                        f"{held['since']} (baseline {held['baseline']:.4g})"))
    return True


def _update_ratio(state: dict[str, Any], events: list[Event], held: dict[str, Any], step: Mapping[str, Any],
                  u: float, w: float, cfg: DetectorConfig) -> None:
    """`update_ratio`: update norm / weight norm. Critical on absolute limits before its band has warmed up
    (`_early_ratio`: only the first steps can catch a run that blows up in its first update), a warning far
    above its band after. Held (`_hold`) until the ratio is back under the limit it broke, or near its band;
    the band learns nothing while a critical is held."""
    ratio = u / w if 0.0 < w < _INF else 0.0
    if not 0.0 < ratio < _INF:  # a quotient of finite norms can still underflow or overflow
        return
    x = _log(ratio)
    n, mu, dev = state["r_n"], state["r_mu"], state["r_dev"]
    if ratio >= cfg.ratio_sustained:
        state["r_big"] += 1
    elif state["r_big"]:
        state["r_big"] = 0
    hold = held.get("update_ratio") if held else None
    if hold is not None:
        if _still_out(state, events, "update_ratio", x, ratio, f"update/weight ratio {ratio:.3g}", step, cfg):
            if hold["severity"] == WARNING:
                _band_update(state, _RATIO_BAND, x, n, mu, dev, cfg)
            return
    elif n < cfg.warmup_steps:
        t = state["last_step"]
        found = _early_ratio(state, step, cfg, t, n, ratio, u, step.get("grad_norm"), step.get("loss"))
        if found is not None:
            baseline, value, message, back_under = found
            _hold(state, "update_ratio", CRITICAL, _log(back_under) if back_under > 0.0 else -_LOG_NO_LIMIT,
                  baseline, t)
            events.append(Event("update_ratio", CRITICAL, t, value, baseline,
                                _ratio_cause(state, step, cfg), message))
            return
    else:
        s = dev if dev > cfg.band_dev_floor else cfg.band_dev_floor
        if (x - mu) / s > cfg.ratio_z and x - mu >= cfg._up_ratio:
            base = _exp(mu)
            t = state["last_step"]
            _hold(state, "update_ratio", WARNING, mu + cfg.resolve_z * s, base, t)
            events.append(Event("update_ratio", WARNING, t, ratio, base, _ratio_cause(state, step, cfg),
                                f"update/weight ratio {ratio:.3g} is {ratio / base:.3g}x its band {base:.3g}"))
    _band_update(state, _RATIO_BAND, x, n, mu, dev, cfg)


def _early_ratio(state: dict[str, Any], step: Mapping[str, Any], cfg: DetectorConfig, t: int, n: int,
                 ratio: float, u: float, g: float | None, loss: float | None
                 ) -> tuple[float, float, str, float] | None:
    """The critical update-ratio rules for the first samples, before the band exists: (limit, value, message,
    the ratio to come back under) of the first one broken, or None. The ratio to come back under is the limit
    broken, except for the Polyak rule, which measures the step against the loss: there, its guard ratio."""
    if state["r_big"] >= cfg.ratio_sustained_steps:
        return (cfg.ratio_sustained, ratio, f"{state['r_big']} updates in a row at least {cfg.ratio_sustained:g}x "
                f"the weight norm (now {ratio:.3g}x)", cfg.ratio_sustained)
    lr = step.get("lr")
    plain = (n == 0 and lr is not None and g is not None and lr > 0.0 and g > 0.0
             and u <= _PLAIN_STEP_TOLERANCE * lr * g)
    if plain and ratio >= cfg.ratio_gradient_step:
        return (cfg.ratio_gradient_step, ratio, f"the first update, a plain gradient step (lr x gradient), moved "
                f"the weights by {ratio:.3g}x their norm (limit {cfg.ratio_gradient_step:g}x)",
                cfg.ratio_gradient_step)
    if (plain and cfg.polyak_limit > 0.0 and ratio >= cfg.polyak_min_ratio and loss is not None
            and 0.0 < loss < _INF and u * g >= cfg.polyak_limit * loss):  # type: ignore[operator]
        rho = u * g / loss  # type: ignore[operator]
        return (cfg.polyak_limit, rho, f"the first update, a plain gradient step, is {rho:.3g}x the Polyak step "
                f"loss/gradient (limit {cfg.polyak_limit:g}x: past it the loss of a quadratic rises); it moved "
                f"the weights by {ratio:.3g}x their norm", cfg.polyak_min_ratio)
    if ratio >= cfg.ratio_critical:
        return (cfg.ratio_critical, ratio, f"update norm is {ratio:.3g}x the weight norm at step {t}, before the "
                f"run has a history (limit {cfg.ratio_critical:g}x)", cfg.ratio_critical)
    return None


def _ratio_cause(state: dict[str, Any], step: Mapping[str, Any], cfg: DetectorConfig) -> str | None:
    """The layer to blame for an outsized update: the one whose own update is largest relative to its weights
    when the client sends per-layer updates; else the usual root cause; else (the first steps, no bands yet)
    the layer with the largest gradient relative to its weights, which is what plain SGD's update follows."""
    names = _names(step)
    lun = step.get("layer_update_norms")
    weights = _as_map(*_layer_view(step.get("layer_weight_norms"), names)) or {}
    if lun:
        uk, uv = _layer_view(lun, names)
        return _largest_ratio(_as_map(uk, uv) or {}, weights)
    gk, gv = _grad_view(step, names)
    return _root_cause(state, step, cfg) or (_largest_ratio(_as_map(gk, gv) or {}, weights) if gv else None)


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
