"""`loss_divergence` (critical): the smoothed loss far above its early level, progress given back, or a loss
jump confirmed on its second step."""

from __future__ import annotations

import math
from typing import Any

from .bands import LOSS_BAND, band_step, seed
from .config import CRITICAL, DetectorConfig
from .events import Event, hold, still_out
from .layers import root_cause
from .step import StepInput

__all__ = ["loss_divergence", "loss_jump"]

_log = math.log
_exp = math.exp


def loss_divergence(state: dict[str, Any], events: list[Event], held: dict[str, Any], step: StepInput,
                     loss: float, cfg: DetectorConfig) -> None:
    """`loss_divergence` (critical): the smoothed loss has stayed well above the run's early level, or a slow
    smoothed loss has given back most of the progress the run made, for `loss_steps` steps. Once it fires, the
    signature is held (`hold`) until that smoothed loss is back under the level it broke."""
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
        if still_out(state, events, "loss_divergence", level, loss, f"smoothed loss {_exp(level):.4g}", step, cfg):
            return
    # the jump test: `loss_jump_steps` consecutive losses far above the loss band held at the first of them (as
    # a factor and in deviations). Inline up to the test: on a quiet step it only teaches the loss band.
    jn, jmu, jdev = state["lj_n"], state["lj_mu"], state["lj_dev"]
    if jn >= cfg.warmup_steps:
        run = state["lj_run"]
        if run:
            base, s = state["lj_base"], state["lj_s"]
        else:
            base, s = jmu, (jdev if jdev > cfg.band_dev_floor else cfg.band_dev_floor)
        up = x - base
        if up >= cfg._up_jump and up >= cfg.loss_jump_z * s:
            if loss_jump(state, events, step, x, loss, run, base, s, up, cfg):
                return
        elif run:
            state["lj_run"] = 0
    if jn >= cfg.warmup_steps:  # the loss band learns (`bands.learn`, inline)
        state["lj_n"] = jn + 1
        state["lj_mu"], state["lj_dev"] = band_step(jmu, jdev, x, cfg.band_alpha, cfg.band_dev_floor, cfg.band_clip)
    else:
        seed(state, LOSS_BAND, x, jn, cfg.warmup_steps)
    limit = start + cfg._up_loss
    if n >= cfg.loss_start_steps and ewm > limit:
        state["l_run"] += 1
        if state["l_run"] == cfg.loss_steps:
            t = state["last_step"]
            base = _exp(limit)
            hold(state, "loss_divergence", CRITICAL, limit, base, t, "l_ewm")
            state["l_run"] = state["lb_run"] = 0  # after the hold, it takes `loss_steps` steps out again
            events.append(Event("loss_divergence", CRITICAL, t, float(loss), base, root_cause(state, step, cfg),
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
            hold(state, "loss_divergence", CRITICAL, best + cfg.loss_giveback_share * progress, level, t, "l_slow")
            state["l_run"] = state["lb_run"] = 0
            events.append(Event("loss_divergence", CRITICAL, t, float(loss), level, root_cause(state, step, cfg),
                                f"smoothed loss {_exp(slow):.4g} has given back {(slow - best) / progress:.0%} of "
                                f"its progress (start {_exp(state['l_start']):.4g}, best {_exp(best):.4g}) "
                                f"for {cfg.loss_steps} steps"))
    elif state["lb_run"]:
        state["lb_run"] = 0


def loss_jump(state: dict[str, Any], events: list[Event], step: StepInput, x: float, loss: float, run: int,
              base: float, s: float, up: float, cfg: DetectorConfig) -> bool:
    """The jump test of `loss_divergence` has found a loss `up` (log units) above the loss band `base` (held at
    the first step of the jump, with its deviation `s`): one more step of the jump, and True if that makes
    `loss_jump_steps` (it fires, and holds the signature until the smoothed loss is back under the level it
    broke; the loss band does not learn the step)."""
    if not run:
        state["lj_base"], state["lj_s"] = base, s
    run = state["lj_run"] = run + 1
    if run < cfg.loss_jump_steps:
        return False
    t = state["last_step"]
    limit = base + cfg._up_jump
    level = _exp(base)
    hold(state, "loss_divergence", CRITICAL, limit, level, t, "l_ewm")
    state["l_run"] = state["lb_run"] = state["lj_run"] = 0
    state["l_ewm"] = x  # a confirmed change of level restarts the smoothing at the new level
    events.append(Event("loss_divergence", CRITICAL, t, float(loss), level, root_cause(state, step, cfg),
                        f"loss {loss:.4g} has jumped to {_exp(up):.3g}x its band {level:.4g} for {run} steps"))
    return True
