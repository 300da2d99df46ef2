"""`StepInput`: one optimizer step as the detectors read it, built in one place by every caller.

The client's local guard (`StepRecord.as_detector_input`), the service (`StepColumns.detector_steps`) and
`gradwatch replay` (`decode_step`) all build their steps with this class's constructor (or `StepInput.of`, from
a trace-style mapping), so there is one definition of what a step carries. The per-layer fields come in one of
two layouts, whichever the builder already has, and `layer_values` reads both:

- lists of values aligned with `layer_names` (the service's columns; pass the same `layer_names` list step after
  step and the detector's name check is a pointer comparison), or
- mappings name -> value (the trace lines and the client's records), with `layer_names` None.

Turning one layout into the other per step would cost a pass over the layers for nothing: the detectors read
the values through the C-level views below either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import INF

__all__ = ["LayerValues", "StepInput", "layer_inputs", "layer_values"]

LayerValues = Mapping[str, "float | None"] | Sequence["float | None"]
"""A per-layer field: name -> value, or values aligned with the step's `layer_names`."""

_prod = math.prod
_hypot = math.hypot
_isfinite = math.isfinite


@dataclass(slots=True)
class StepInput:
    """One optimizer step for `advance`. A None (or missing) value is not judged; values may be NaN or infinite.

    Slotted: building one costs about what the dict display it replaces did, and the detectors read its
    fields as slots instead of `dict.get` calls (see docs/detection.md, Speed)."""

    step: int
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    update_norm: float | None = None
    skipped: bool = False
    """AMP's GradScaler dropped the step (inf/NaN gradients): counted, but it neither alerts nor teaches."""
    layer_names: Sequence[str] | None = None
    """The names the per-layer lists are aligned with; None when the per-layer fields are mappings."""
    layer_grad_norms: LayerValues | None = None
    layer_weight_norms: LayerValues | None = None
    layer_update_norms: LayerValues | None = None

    @classmethod
    def of(cls, step: Mapping[str, Any]) -> StepInput:
        """A step from a mapping with the trace step-line keys (`docs/detection.md`): the older dict input of
        `advance`, and what `gradwatch replay` decodes."""
        get = step.get
        return cls(step["step"], get("loss"), get("grad_norm"), get("lr"), get("update_norm"),
                   bool(get("skipped")), get("layer_names"), get("layer_grad_norms"), get("layer_weight_norms"),
                   get("layer_update_norms"))

    def __getitem__(self, key: str) -> Any:
        """The field `key`, for code that still reads a step as the mapping it replaced (`step["step"]`)."""
        return getattr(self, key)


def names_of(step: StepInput) -> list[str] | None:
    """The step's `layer_names` as a list (the names of per-layer values sent as sequences), or None."""
    names = step.layer_names
    return list(names) if names is not None and type(names) is not list else names


def layer_values(m: Any, names: Sequence[str] | None) -> tuple[Sequence[str] | None, Any]:
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


def grad_values(step: StepInput, names: list[str] | None) -> tuple[Sequence[str] | None, Any]:
    """(layer names, grad norms in the same order) of the step's layer grad norms, whichever form they came in."""
    lgn = step.layer_grad_norms
    if names is not None and type(lgn) is list and len(lgn) == len(names):  # the service's form
        return names, lgn
    if type(lgn) is dict:  # replay's and the client's
        return (list(lgn), lgn.values()) if lgn else (None, None)
    return layer_values(lgn, names)


def as_map(keys: Sequence[str] | None, values: Any) -> dict[str, Any] | None:
    return dict(zip(keys, values, strict=False)) if keys is not None and values is not None else None


def all_finite(values: Any) -> bool:
    """A sum is finite only if every term is (or it overflowed, which the caller then checks one by one)."""
    try:
        return _isfinite(sum(values))
    except TypeError:  # a None among the values
        return _isfinite(sum(v for v in values if v is not None))


def first_nonfinite(names: Sequence[str], values: Any) -> tuple[str | None, float]:
    """The first layer (in the step's order) with a non-finite norm and its value; (None, nan) if none."""
    for name, v in zip(names, values, strict=False):
        if v is not None and not _isfinite(v):
            return name, float(v)
    return None, math.nan


def layer_inputs(names: Sequence[str] | None, lgn: Any, lwn: Any, lun: Any
                 ) -> tuple[list[str] | None, Sequence[str] | None, Any, float | None, float | None, bool]:
    """What the detectors read from a step's per-layer fields (`layer_names`, `layer_grad_norms`,
    `layer_weight_norms`, `layer_update_norms`), whichever form they came in: (layer_names as a list, the grad
    norms' layer names, the grad norms, their product, the L2 norm of the weights, whether every layer norm is
    certainly finite). The product (the geometric mean's) and the L2 norm are non-finite if any term is, so
    they also serve as the non-finite check's fast path."""
    if names is not None and type(names) is not list:
        names = list(names)
    gk: Sequence[str] | None
    gv: Any
    if names is not None and type(lgn) is list and len(lgn) == len(names):  # the service's form
        gk, gv = names, lgn
    elif type(lgn) is dict:  # replay's and the client's
        if lgn:
            gk, gv = list(lgn), list(lgn.values())  # a list: two passes over it below cost less than over a view
        else:
            gk = gv = None
    else:
        gk, gv = layer_values(lgn, names)
    wv: Any
    finite = True
    gprod = None
    if gv is not None:
        try:
            gprod = _prod(gv)
        except TypeError:  # a None among them
            gprod = None
        finite = gprod is not None and 0.0 < gprod < INF
    w = None
    if lwn:
        if names is not None and type(lwn) is list and len(lwn) == len(names):
            wv = lwn
        else:
            wv = lwn.values() if type(lwn) is dict else layer_values(lwn, names)[1]
        try:
            w = _hypot(*wv)
        except TypeError:  # a None among them
            w = _hypot(*[v for v in wv if v is not None])
        finite = finite and _isfinite(w)
    if lun:
        finite = finite and all_finite(lun.values() if isinstance(lun, Mapping) else lun)
    return names, gk, gv, gprod, w, finite
