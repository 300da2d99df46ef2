"""`Event`, and the holds: a signature that fired stays held, and refires, until its signal is back near the
baseline it broke, so that its incident (`gradwatch.incidents`) stays open while the run is still broken."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from .config import DetectorConfig
from .layers import root_cause
from .step import StepInput

__all__ = ["Event", "held_signatures", "hold", "still_out"]

_exp = math.exp


@dataclass
class Event:
    """One detector finding at one step. `baseline` is the band value or limit the measurement broke.

    Values stay floats (NaN and infinities included): spelling them for JSON is the job of whoever writes them
    out (`gradwatch.wire.encode_value`)."""

    signature: str
    severity: str
    step: int
    value: float | None
    baseline: float | None
    layer: str | None
    message: str


def held_signatures(state: dict[str, Any]) -> Collection[str]:
    """The signatures fired and not yet back near the baseline they broke (`hold`): their incidents stay open
    (`gradwatch.incidents.track_incidents(..., held=...)`)."""
    held: dict[str, Any] = state["held"]
    return held  # its keys; the live dict itself, which costs nothing to hand over


def hold(state: dict[str, Any], signature: str, severity: str, limit: float, baseline: float, t: int,
         series: str | None = None) -> None:
    """Hold a signature that fired until its signal is back under `limit` (log space): near the baseline the
    run had when it broke out, not near a band that went on to learn the explosion. Each judged step that is
    still out fires the signature again, so its incident stays open (it resolves `resolve_after_steps` after
    the signal came back); a run that ends out, or goes non-finite, leaves it open. While a critical
    signature is held, its signal's bands learn nothing."""
    state["held"][signature] = {"severity": severity, "limit": limit, "baseline": baseline, "since": t,
                                "series": series}


def still_out(state: dict[str, Any], events: list[Event], signature: str, x: float, value: float | None,
              what: str, step: StepInput, cfg: DetectorConfig) -> bool:
    """A held signature's step: True, and the signature fires again, while `x` (the log of the signal; NaN for
    a non-finite step) is not back under the level it broke; else the hold ends and the step is judged as
    usual."""
    held = state["held"][signature]
    if x <= held["limit"]:
        del state["held"][signature]
        return False
    events.append(Event(signature, held["severity"], state["last_step"], None if value is None else float(value),
                        held["baseline"], root_cause(state, step, cfg),
                        f"{what} is still above {_exp(held['limit']):.4g}, the level it broke at step "
                        f"{held['since']} (baseline {held['baseline']:.4g})"))
    return True
