"""`advance`: one step through every detector, in order. A short orchestrator over the signature modules."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .bands import GMEAN_BAND, GRAD_BAND, band_step, seed
from .config import DEFAULT, DetectorConfig
from .events import Event, still_out
from .grad import grad_growth, grad_spike
from .layers import track_breakouts
from .loss import loss_divergence
from .nonfinite import nonfinite
from .ratio import update_ratio
from .state import STATE_VERSION, upgraded
from .step import StepInput, layer_inputs

__all__ = ["advance"]

_log = math.log
_isfinite = math.isfinite


def advance(state: dict[str, Any], step: StepInput | Mapping[str, Any],
            config: DetectorConfig | None = None) -> tuple[dict[str, Any], list[Event]]:
    """Feed one optimizer step to the detectors; returns the (same, updated) state and the events it raised.

    `step` is a `StepInput` (or a mapping with the trace step-line keys, which `StepInput.of` reads; see
    docs/detection.md); missing values are simply not judged. A step with `skipped` true (AMP's GradScaler
    dropped it for inf/NaN gradients) is counted but neither alerts nor teaches the bands anything: the
    scaler already handled it.
    """
    cfg = config if config is not None else DEFAULT
    if state.get("v") != STATE_VERSION:
        state = upgraded(state, cfg)
    if type(step) is not StepInput:
        step = StepInput.of(step)  # type: ignore[arg-type]
    t = step.step
    if type(t) is not int:
        t = int(t)
    steps = state["steps"] = state["steps"] + 1
    state["last_step"] = t
    if step.skipped:
        return state, []
    loss = step.loss
    g = step.grad_norm
    u = step.update_norm
    names, gk, gv, gprod, w, layers_finite = layer_inputs(step.layer_names, step.layer_grad_norms,
                                                          step.layer_weight_norms, step.layer_update_norms)
    if not layers_finite or not _isfinite((loss or 0.0) + (g or 0.0) + (u or 0.0)):
        bad = nonfinite(state, t, loss, g, u, w, gprod, names, gk, gv, step, cfg)
        if bad is not None:
            events = [bad]
            for signature in list(state["held"]):  # a non-finite step is not back near any baseline
                still_out(state, events, signature, math.nan, None, f"{signature} at a non-finite step", step, cfg)
            return state, events

    events = []
    held = state["held"]  # (empty on most steps: `held and ...` skips the lookups)
    gm = track_breakouts(state, held, steps, t, names, gk, gv, gprod, cfg) if gv is not None else None
    if g is not None and g > 0.0:
        x = _log(g)
        n, mu, dev = state["g_n"], state["g_mu"], state["g_dev"]
        warm = n >= cfg.warmup_steps
        if held and "grad_growth" in held:
            still_out(state, events, "grad_growth", x, g, f"grad norm {g:.4g}", step, cfg)
        elif warm and (x - mu >= cfg._growth_screen or state["gr_n"] or state["gw_n"]):
            # (on a quiet step, no climb under way and none starting, `grad_growth` would do nothing)
            grad_growth(state, events, step, x, mu, dev, gm, cfg)
        if held and "grad_spike" in held:
            still_out(state, events, "grad_spike", x, g, f"grad norm {g:.4g}", step, cfg)
        elif warm and x - mu >= cfg._up_spike and "grad_growth" not in held:  # (most steps are not)
            grad_spike(state, events, step, x, mu, dev, cfg)
        if not held or "grad_growth" not in held:  # the grad norm band learns (`bands.learn`, inline)
            if warm:
                state["g_n"] = n + 1
                state["g_mu"], state["g_dev"] = band_step(mu, dev, x, cfg.band_alpha, cfg.band_dev_floor,
                                                          cfg.band_clip)
            else:
                seed(state, GRAD_BAND, x, n, cfg.warmup_steps)
    if gm is not None and (not held or "grad_growth" not in held):  # so does the layers' geometric mean's
        n = state["m_n"]
        if n >= cfg.warmup_steps:
            state["m_n"] = n + 1
            state["m_mu"], state["m_dev"] = band_step(state["m_mu"], state["m_dev"], gm, cfg.band_alpha,
                                                      cfg.band_dev_floor, cfg.band_clip)
        else:
            seed(state, GMEAN_BAND, gm, n, cfg.warmup_steps)
    if loss is not None and loss > 0.0:
        loss_divergence(state, events, held, step, loss, cfg)
    if u is not None and w is not None:
        update_ratio(state, events, held, step, u, w, cfg)
    return state, events
