"""`nonfinite` (critical at once): any NaN or infinity among the step's values."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradwatch.wire import encode_value

from .config import CRITICAL, INF, DetectorConfig
from .events import Event
from .layers import root_cause
from .step import StepInput, all_finite, first_nonfinite, layer_values

__all__ = ["nonfinite"]

_isfinite = math.isfinite


def nonfinite(state: dict[str, Any], t: int, loss: float | None, g: float | None, u: float | None,
               w: float | None, gprod: float | None, names: list[str] | None, gk: Sequence[str] | None, gv: Any,
               step: StepInput, cfg: DetectorConfig) -> Event | None:
    """`nonfinite`: any NaN or infinity among the step's values, critical at once (and the step teaches
    nothing). Names what went non-finite (the first of loss, grad norm, update norm, else a layer norm) and
    the layer to blame (the first non-finite one in the step's order, else the usual root cause)."""
    bad_layer: str | None = None
    bad_value = math.nan
    if gv is not None and (gprod is None or not 0.0 < gprod < INF) and not all_finite(gv):
        bad_layer, bad_value = first_nonfinite(gk, gv)  # type: ignore[arg-type]
    if bad_layer is None and w is not None and not _isfinite(w):
        bad_layer = first_nonfinite(*layer_values(step.layer_weight_norms, names))[0]  # type: ignore[arg-type]
    lun = step.layer_update_norms
    if bad_layer is None and lun and not all_finite(lun.values() if isinstance(lun, Mapping) else lun):
        bad_layer = first_nonfinite(*layer_values(lun, names))[0]  # type: ignore[arg-type]
    if (bad_layer is None and (loss is None or _isfinite(loss)) and (g is None or _isfinite(g))
            and (u is None or _isfinite(u))):
        return None
    bad = [(what, v) for what, v in (("loss", loss), ("grad_norm", g), ("update_norm", u))
           if v is not None and not _isfinite(v)]
    layer = bad_layer if bad_layer is not None else root_cause(state, step, cfg)
    what, value = bad[0] if bad else ("layer norm", math.nan)
    if not bad and bad_layer is not None and not math.isnan(bad_value):  # the layer norm the message names
        value = bad_value
    where = f" (first in layer {layer})" if layer else ""
    return Event("nonfinite", CRITICAL, t, float(value), None, layer,
                 f"{what} is {encode_value(float(value))} at step {t}{where}")

