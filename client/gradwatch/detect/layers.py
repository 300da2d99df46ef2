"""Per-layer bands, breakouts and the root cause: which layer to blame when a signature fires.

Every step compares each layer's grad norm with its breakout limit in one C-level pass and Python touches a
layer only while it is out; the per-layer bands learn (through `bands.band_step`) one step in `layer_every`,
and every step while they warm up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import compress
from operator import gt as _gt
from typing import Any

from .bands import band_step, limit
from .config import INF, LOG_NO_LIMIT, NO_LIMIT, DetectorConfig
from .step import StepInput, grad_values, names_of

__all__ = ["learn_layers", "realign_layers", "root_cause", "track_breakouts"]

_log = math.log
_exp = math.exp
_isfinite = math.isfinite


def root_cause(state: dict[str, Any], step: StepInput, cfg: DetectorConfig) -> str | None:
    """The layer to blame: the one that broke out of its own band first and is still out; failing that (every
    layer is noisy enough to stay inside its band), the layer furthest above its band right now (the step's
    layer grad norms). Only called when an event fires, so the O(layers) fallback costs nothing on quiet
    steps, and the signatures need not carry the layer norms for it."""
    out: dict[str, int] = state["out"]
    if out:
        return min(out.items(), key=lambda kv: (kv[1], kv[0]))[0]
    keys, values = grad_values(step, names_of(step))
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


def track_breakouts(state: dict[str, Any], held: dict[str, Any], steps: int, t: int, names: list[str] | None,
                    gk: Sequence[str] | None, gv: Any, gprod: float | None, cfg: DetectorConfig) -> float | None:
    """Root-cause bookkeeping: which layers are above their breakout limits now, and since when (one C-level
    pass over plain norms; Python touches a layer only while it is out), and the per-layer bands' lesson when
    due. Returns the log geometric mean of the layer grad norms for the network-wide growth test (None with
    too few layers, or a dead one)."""
    layers = state["layers"]
    if gk != layers:
        realign_layers(state, gk)  # type: ignore[arg-type]
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
        learn_layers(state, gv, cfg, True)
    elif state["ly_young"]:
        learn_layers(state, gv, cfg, False)
    n_layers = len(layers)
    if n_layers < cfg.growth_layer_min_layers or gprod is None:
        return None
    if 0.0 < gprod < INF:
        return _log(gprod) / n_layers
    try:  # the product under- or overflowed: add the logs instead
        return sum(map(_log, gv)) / n_layers
    except ValueError:  # a zero norm (a dead layer)
        return None


def learn_layers(state: dict[str, Any], values: Any, cfg: DetectorConfig, due: bool) -> None:
    """Teach every layer's band one sample (log space, `bands.band_step`) and renew its limit.

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
                    lims[i] = NO_LIMIT
                    continue
            mus[i], devs[i] = band_step(mus[i], devs[i], x, a if k is None else max(a, 1.0 / (k + 1)), floor, clip)
            lims[i] = limit(mus[i], devs[i], floor, z) if names[i] not in young else NO_LIMIT
        return
    z_floor = z * floor
    i = -1
    for x in xs:
        i += 1
        if x is None:
            continue
        mu, dv = band_step(mus[i], devs[i], x, a, floor, clip)
        mus[i] = mu
        devs[i] = dv
        e = mu + (z * dv if dv > floor else z_floor)  # `bands.limit`, inline: this loop is the layers' hot path
        lims[i] = _exp(e) if e < LOG_NO_LIMIT else NO_LIMIT


def realign_layers(state: dict[str, Any], keys: Sequence[str]) -> None:
    """The set or order of layers changed: keep the bands of layers still present, start new ones fresh.

    The geometric mean of a different set of layers is a different quantity: its band starts over."""
    old = {name: (mu, dev, lim) for name, mu, dev, lim in
           zip(state["layers"], state["ly_mu"], state["ly_dev"], state["ly_lim"], strict=True)}
    names = list(keys)
    fresh = (None, 0.0, NO_LIMIT)
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
