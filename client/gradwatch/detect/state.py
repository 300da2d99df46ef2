"""Detector state: a fresh one, and one stored by an older version brought up to this one.

The state is a small JSON-serialisable dict, O(1) per run (plus a name and three floats per layer); the
service keeps it in its database across upgrades, so a state of any earlier version continues.
"""

from __future__ import annotations

from typing import Any

from .bands import limit
from .config import NO_LIMIT, DetectorConfig

__all__ = ["STATE_VERSION", "new_state", "upgraded"]

STATE_VERSION = 4


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
        "gr_n": 0, "gr_base": 0.0, "gr_dev": 0.0, "gr_rise": 0, "gr_last": 0.0, "gw_n": 0,
        # band of the log geometric mean of the layer grad norms (the network-wide growth test)
        "m_n": 0, "m_mu": 0.0, "m_dev": 0.0, "m_warm": [],
        # loss: early baseline, smoothed log loss, consecutive divergent steps
        "l_n": 0, "l_first": 0.0, "l_sum": 0.0, "l_start": 0.0, "l_ewm": 0.0, "l_run": 0,
        # loss give-back: slow smoothed log loss, its best level, consecutive steps past the share
        "l_slow": 0.0, "l_best": 0.0, "lb_run": 0,
        # loss band (log space) and the jump test: consecutive steps far above the band held at the first one
        "lj_n": 0, "lj_mu": 0.0, "lj_dev": 0.0, "lj_warm": [], "lj_run": 0, "lj_base": 0.0, "lj_s": 0.0,
        # update ratio band (log of update norm / weight norm)
        "r_n": 0, "r_mu": 0.0, "r_dev": 0.0, "r_warm": [], "r_big": 0,
        # per-layer grad norm bands, aligned with "layers": log mean (None until a layer's first sample),
        # deviation, breakout limit as a plain norm; layers still warming up their band -> samples so far
        # (every layer at the start)
        "layers": [], "ly_mu": [], "ly_dev": [], "ly_lim": [], "ly_young": {},
        # layers now above their breakout limit: name -> first step out (the root-cause candidates)
        "out": {},
        # critical signatures whose signal has not come back yet (`hold`): signature -> the log level it must
        # come back under, the baseline it broke, the step it broke out, the smoothed series judged (loss)
        "held": {},
    }


def upgraded(state: dict[str, Any], cfg: DetectorConfig) -> dict[str, Any]:
    """A state stored by another version of this module, with whatever it lacks taken from a fresh state.

    The service keeps states in its database across upgrades; a new detector starts from scratch only on the
    parts it did not have before. Version 1 taught every layer's band every step and had no breakout limits:
    its bands are kept and the limits derived from them. Version 2 held nothing (`hold`): nothing is held.
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
            fresh["ly_lim"] = [limit(mu, dev, floor, z) for mu, dev in zip(mus, devs, strict=True)]
        else:  # not warm yet: start the layer bands over
            fresh["ly_mu"] = [None] * len(names)
            fresh["ly_dev"] = [0.0] * len(names)
            fresh["ly_lim"] = [NO_LIMIT] * len(names)
            fresh["ly_young"] = dict.fromkeys(names, 0)
            fresh["out"] = {}
    return fresh
