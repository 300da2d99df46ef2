"""The grad norm's signatures: `grad_growth` (critical) and `grad_spike` (warning)."""

from __future__ import annotations

import math
from typing import Any

from .config import CRITICAL, WARNING, DetectorConfig
from .events import Event, hold
from .layers import root_cause
from .step import StepInput

__all__ = ["grad_growth", "grad_spike"]

_exp = math.exp


def grad_growth(state: dict[str, Any], events: list[Event], step: StepInput, x: float, mu: float,
                 dev: float, gm: float | None, cfg: DetectorConfig) -> None:
    """`grad_growth` (critical): the grad norm has climbed for `growth_steps` steps above the band held at the
    start of the climb (a band that chased an exponential would never see it), or the whole network (the
    total and the geometric mean of the layers) has stood far above its bands for `growth_layer_steps`.
    Keeps both counters on every step; when it fires it holds the signature (`hold`). `x` is the log of the
    grad norm, `mu` and `dev` its band's."""
    floor = cfg.band_dev_floor
    s = dev if dev > floor else floor
    climb = state["gr_n"]
    if climb:
        if x > state["gr_base"] + cfg.growth_z * state["gr_dev"]:
            climb += 1
            state["gr_rise"] = state["gr_rise"] + 1 if x > state["gr_last"] else 1
        else:
            climb = 0
        state["gr_n"] = climb
        state["gr_last"] = x
    elif (x - mu) / s > cfg.growth_z:
        climb = state["gr_n"] = state["gr_rise"] = 1
        state["gr_base"] = mu
        state["gr_dev"] = s
        state["gr_last"] = x
    wide = state["gw_n"]
    if gm is not None and x - mu >= cfg._up_layers and state["m_n"] >= cfg.warmup_steps:
        dm = gm - state["m_mu"]
        md = state["m_dev"]
        wide = wide + 1 if dm >= cfg._up_layers and dm >= cfg.growth_layer_z * (md if md > floor else floor) else 0
        state["gw_n"] = wide
    elif wide:
        wide = state["gw_n"] = 0
    if ((climb >= cfg.growth_steps or (climb and state["gr_rise"] >= cfg.growth_rising_steps))
            and x - state["gr_base"] >= cfg._up_growth):
        t, g = state["last_step"], step.grad_norm
        assert g is not None
        base = _exp(state["gr_base"])
        hold(state, "grad_growth", CRITICAL, state["gr_base"] + cfg.resolve_z * state["gr_dev"], base, t)
        events.append(Event("grad_growth", CRITICAL, t, float(g), base, root_cause(state, step, cfg),
                            f"grad norm {g:.4g} has grown {g / base:.3g}x over {state['gr_n']} steps "
                            f"(band {base:.4g}){', rising on each' if state['gr_rise'] >= climb else ''}"))
        return
    if wide >= cfg.growth_layer_steps:
        t, g = state["last_step"], step.grad_norm
        assert g is not None
        base = _exp(mu)
        hold(state, "grad_growth", CRITICAL, mu + cfg.resolve_z * s, base, t)
        events.append(Event("grad_growth", CRITICAL, t, float(g), base, root_cause(state, step, cfg),
                            f"the whole network climbs: the geometric mean of the layer grad norms is "
                            f"{_exp(gm - state['m_mu']):.3g}x its band and the grad norm {g:.4g} "
                            f"{g / base:.3g}x its band, for {state['gw_n']} steps"))


def grad_spike(state: dict[str, Any], events: list[Event], step: StepInput, x: float, mu: float,
                dev: float, cfg: DetectorConfig) -> None:
    """`grad_spike` (warning): one grad norm far above its band, in deviations and as a factor. Healthy runs
    spike too, so this pages no one. Held (`hold`) until the grad norm is back near the band it broke; the
    band itself keeps learning (a warning does not freeze it). `mu` and `dev` are the grad norm band's."""
    s = dev if dev > cfg.band_dev_floor else cfg.band_dev_floor
    if (x - mu) / s > cfg.spike_z and x - mu >= cfg._up_spike:
        t, g = state["last_step"], step.grad_norm
        assert g is not None
        base = _exp(mu)
        hold(state, "grad_spike", WARNING, mu + cfg.resolve_z * s, base, t)
        events.append(Event("grad_spike", WARNING, t, float(g), base, root_cause(state, step, cfg),
                            f"grad norm {g:.4g} is {g / base:.3g}x its band {base:.4g}"))

