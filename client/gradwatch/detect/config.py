"""`DetectorConfig`: every threshold the detectors use, and the constants they share."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar

from gradwatch.incidents import RESOLVE_AFTER_STEPS

__all__ = ["CRITICAL", "DEFAULT", "SIGNATURES", "WARNING", "DetectorConfig"]

SIGNATURES = ("nonfinite", "grad_spike", "grad_growth", "loss_divergence", "update_ratio")
WARNING = "warning"
CRITICAL = "critical"

INF = math.inf
NO_LIMIT = sys.float_info.max  # a breakout limit no finite norm exceeds (JSON cannot hold infinity)
LOG_NO_LIMIT = math.log(NO_LIMIT)
_log = math.log


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
    growth_rising_steps: int = 3
    """A climb fires sooner when it rises on every step: this many consecutive counting steps, each grad norm
    above the one before, and the last `growth_min_factor` times the band. Exponential growth rises step after
    step; noise, even heavy-tailed noise, does not (a healthy spike falls back the next step)."""
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
    loss_jump_factor: float = 2.0
    """Divergent, too, when the loss jumps: `loss_jump_steps` consecutive losses each at least this many times
    the loss band held at the first of them ..."""
    loss_jump_z: float = 6.0
    """... and this many of its deviations above it (the loss band is learned like the grad norm's)."""
    loss_jump_steps: int = 2
    """The second step confirms the first: a single bad batch is not a blow-up, a loss that stays up is."""
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
    _up_jump: ClassVar[float]
    _up_progress: ClassVar[float]
    _up_ratio: ClassVar[float]
    _band: ClassVar[tuple[int, float, float, float]]  # what `bands.learn` reads, in one attribute
    _growth_screen: ClassVar[float]  # a grad norm less than this above its band starts no growth (`advance`)

    def __post_init__(self) -> None:
        for attr, factor in (("_up_layers", self.growth_layer_min_factor), ("_up_growth", self.growth_min_factor),
                             ("_up_spike", self.spike_min_factor), ("_up_loss", self.loss_factor),
                             ("_up_jump", self.loss_jump_factor),
                             ("_up_progress", self.loss_giveback_min_progress),
                             ("_up_ratio", self.ratio_min_factor)):
            ok = isinstance(factor, (int, float)) and factor > 0
            object.__setattr__(self, attr, _log(factor) if ok else -INF)  # a factor <= 0: any level will do
        object.__setattr__(self, "_band", (self.warmup_steps, self.band_dev_floor, self.band_clip, self.band_alpha))
        # `grad_growth` can do something on a step only if a climb is under way, or the grad norm is at least
        # this far above its band: (x - mu) / s > growth_z with s >= band_dev_floor, or x - mu >= _up_layers
        # (0.999 of the first bound leaves room for rounding); -inf where a setting makes any step count
        screen = min(0.999 * self.growth_z * self.band_dev_floor, self._up_layers)
        always = (self.growth_steps <= 0 or self.growth_layer_steps <= 0 or not self.growth_z > 0
                  or not self.band_dev_floor > 0)
        object.__setattr__(self, "_growth_screen", -INF if always else screen)


DEFAULT = DetectorConfig()
