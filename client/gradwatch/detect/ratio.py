"""`update_ratio`: update norm / weight norm. Critical on absolute limits in the first steps, a warning far
above its band after."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .bands import RATIO_BAND, band_step, learn, seed
from .config import CRITICAL, INF, LOG_NO_LIMIT, WARNING, DetectorConfig
from .events import Event, hold, still_out
from .layers import root_cause
from .step import StepInput, as_map, grad_values, layer_values, names_of

__all__ = ["early_ratio", "ratio_cause", "update_ratio"]

_log = math.log
_exp = math.exp
_PLAIN_STEP_TOLERANCE = 1.05  # weight decay adds a little to a plain gradient step


def update_ratio(state: dict[str, Any], events: list[Event], held: dict[str, Any], step: StepInput,
                  u: float, w: float, cfg: DetectorConfig) -> None:
    """`update_ratio`: update norm / weight norm. Critical on absolute limits before its band has warmed up
    (`early_ratio`: only the first steps can catch a run that blows up in its first update), a warning far
    above its band after. Held (`hold`) until the ratio is back under the limit it broke, or near its band;
    the band learns nothing while a critical is held."""
    ratio = u / w if 0.0 < w < INF else 0.0
    if not 0.0 < ratio < INF:  # a quotient of finite norms can still underflow or overflow
        return
    x = _log(ratio)
    n, mu, dev = state["r_n"], state["r_mu"], state["r_dev"]
    if ratio >= cfg.ratio_sustained:
        state["r_big"] += 1
    elif state["r_big"]:
        state["r_big"] = 0
    held_now = held.get("update_ratio") if held else None
    if held_now is not None:
        if still_out(state, events, "update_ratio", x, ratio, f"update/weight ratio {ratio:.3g}", step, cfg):
            if held_now["severity"] == WARNING:
                learn(state, RATIO_BAND, x, n, mu, dev, cfg)
            return
    elif n < cfg.warmup_steps:
        t = state["last_step"]
        found = early_ratio(state, step, cfg, t, n, ratio, u, step.grad_norm, step.loss)
        if found is not None:
            baseline, value, message, back_under = found
            hold(state, "update_ratio", CRITICAL, _log(back_under) if back_under > 0.0 else -LOG_NO_LIMIT,
                  baseline, t)
            events.append(Event("update_ratio", CRITICAL, t, value, baseline,
                                ratio_cause(state, step, cfg), message))
            return
    else:
        s = dev if dev > cfg.band_dev_floor else cfg.band_dev_floor
        if (x - mu) / s > cfg.ratio_z and x - mu >= cfg._up_ratio:
            base = _exp(mu)
            t = state["last_step"]
            hold(state, "update_ratio", WARNING, mu + cfg.resolve_z * s, base, t)
            events.append(Event("update_ratio", WARNING, t, ratio, base, ratio_cause(state, step, cfg),
                                f"update/weight ratio {ratio:.3g} is {ratio / base:.3g}x its band {base:.3g}"))
    if n >= cfg.warmup_steps:  # the ratio band learns (`bands.learn`, inline)
        state["r_n"] = n + 1
        state["r_mu"], state["r_dev"] = band_step(mu, dev, x, cfg.band_alpha, cfg.band_dev_floor, cfg.band_clip)
    else:
        seed(state, RATIO_BAND, x, n, cfg.warmup_steps)


def early_ratio(state: dict[str, Any], step: StepInput, cfg: DetectorConfig, t: int, n: int,
                 ratio: float, u: float, g: float | None, loss: float | None
                 ) -> tuple[float, float, str, float] | None:
    """The critical update-ratio rules for the first samples, before the band exists: (limit, value, message,
    the ratio to come back under) of the first one broken, or None. The ratio to come back under is the limit
    broken, except for the Polyak rule, which measures the step against the loss: there, its guard ratio."""
    if state["r_big"] >= cfg.ratio_sustained_steps:
        return (cfg.ratio_sustained, ratio, f"{state['r_big']} updates in a row at least {cfg.ratio_sustained:g}x "
                f"the weight norm (now {ratio:.3g}x)", cfg.ratio_sustained)
    lr = step.lr
    plain = (n == 0 and lr is not None and g is not None and lr > 0.0 and g > 0.0
             and u <= _PLAIN_STEP_TOLERANCE * lr * g)
    if plain and ratio >= cfg.ratio_gradient_step:
        return (cfg.ratio_gradient_step, ratio, f"the first update, a plain gradient step (lr x gradient), moved "
                f"the weights by {ratio:.3g}x their norm (limit {cfg.ratio_gradient_step:g}x)",
                cfg.ratio_gradient_step)
    if (plain and cfg.polyak_limit > 0.0 and ratio >= cfg.polyak_min_ratio and loss is not None
            and 0.0 < loss < INF and u * g >= cfg.polyak_limit * loss):  # type: ignore[operator]
        rho = u * g / loss  # type: ignore[operator]
        return (cfg.polyak_limit, rho, f"the first update, a plain gradient step, is {rho:.3g}x the Polyak step "
                f"loss/gradient (limit {cfg.polyak_limit:g}x: past it the loss of a quadratic rises); it moved "
                f"the weights by {ratio:.3g}x their norm", cfg.polyak_min_ratio)
    if ratio >= cfg.ratio_critical:
        return (cfg.ratio_critical, ratio, f"update norm is {ratio:.3g}x the weight norm at step {t}, before the "
                f"run has a history (limit {cfg.ratio_critical:g}x)", cfg.ratio_critical)
    return None


def ratio_cause(state: dict[str, Any], step: StepInput, cfg: DetectorConfig) -> str | None:
    """The layer to blame for an outsized update: the one whose own update is largest relative to its weights
    when the client sends per-layer updates; else the usual root cause; else (the first steps, no bands yet)
    the layer with the largest gradient relative to its weights, which is what plain SGD's update follows."""
    names = names_of(step)
    lun = step.layer_update_norms
    weights = as_map(*layer_values(step.layer_weight_norms, names)) or {}
    if lun:
        uk, uv = layer_values(lun, names)
        return largest_ratio(as_map(uk, uv) or {}, weights)
    gk, gv = grad_values(step, names)
    return root_cause(state, step, cfg) or (largest_ratio(as_map(gk, gv) or {}, weights) if gv else None)


def largest_ratio(numerators: Mapping[str, Any], weights: Mapping[str, Any]) -> str | None:
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

