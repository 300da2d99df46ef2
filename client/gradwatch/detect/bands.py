"""Robust bands in log space: the one place a band learns.

A band is a mean and a mean absolute deviation of a log-space series. `band_step` is its update, the only
one: an exponentially weighted mean whose input is clipped to `band_clip` deviations, ZClip-style (one spike
moves it a little, a lasting change of level moves it all the way within a few band memories), and the same
for the deviation. Every band learns through it: the scalar bands kept under their keys in the state
(`learn`: grad norm, update ratio, geometric mean of the layers, loss), and the per-layer bands kept in lists
(`gradwatch.detect.layers.learn_layers`). What differs is only how a band starts: a scalar band is the median
and mean absolute deviation of its first `warmup_steps` samples (`seed`), a layer band a running mean with
weight 1/samples until it has them.
"""

from __future__ import annotations

import math
from typing import Any

from .config import LOG_NO_LIMIT, NO_LIMIT, DetectorConfig

__all__ = ["GMEAN_BAND", "GRAD_BAND", "LOSS_BAND", "RATIO_BAND", "band_step", "learn", "limit", "seed"]

_exp = math.exp

# the state keys of the scalar bands: (samples, mean, deviation, warm-up samples)
GRAD_BAND = ("g_n", "g_mu", "g_dev", "g_warm")
RATIO_BAND = ("r_n", "r_mu", "r_dev", "r_warm")
GMEAN_BAND = ("m_n", "m_mu", "m_dev", "m_warm")
LOSS_BAND = ("lj_n", "lj_mu", "lj_dev", "lj_warm")


def band_step(mu: float, dev: float, x: float, a: float, floor: float, clip: float) -> tuple[float, float]:
    """The band update: (mean, deviation) after one sample `x` with weight `a`. The sample moves the band as if
    it were at most `clip` deviations away (the deviation judged with is at least `floor`)."""
    d = x - mu
    lim = clip * (dev if dev > floor else floor)
    if d > lim:
        d = lim
    elif d < -lim:
        d = -lim
    return mu + a * d, dev + a * ((d if d >= 0.0 else -d) - dev)


def limit(mu: float, dev: float, floor: float, z: float) -> float:
    """The plain value `z` deviations above a band (a layer's breakout limit); NO_LIMIT past what floats hold."""
    e = mu + z * (dev if dev > floor else floor)
    return _exp(e) if e < LOG_NO_LIMIT else NO_LIMIT


def learn(state: dict[str, Any], keys: tuple[str, str, str, str], x: float, n: int, mu: float, dev: float,
          cfg: DetectorConfig) -> None:
    """Teach a scalar band one sample (log space). `n`, `mu` and `dev` are the band's count, mean and deviation
    as they are in `state` (the signatures have read them already to judge the step).

    The first `warmup_steps` samples are kept and the band is their median and mean absolute deviation from
    it (`seed`), so a wild first step (common: the untrained model) cannot skew the band for long; after
    that, `band_step`.
    """
    warmup, floor, clip, a = cfg._band
    if n < warmup:
        seed(state, keys, x, n, warmup)
        return
    state[keys[0]] = n + 1
    state[keys[1]], state[keys[2]] = band_step(mu, dev, x, a, floor, clip)


def seed(state: dict[str, Any], keys: tuple[str, str, str, str], x: float, n: int, warmup: int) -> None:
    """`learn` during a band's first `warmup` samples: the median and mean absolute deviation of the samples so
    far (kept in the band's warm-up list until then)."""
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
