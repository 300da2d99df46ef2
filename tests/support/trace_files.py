"""A trace of the labelled traces' format made up for tests: healthy steps, a gradient norm that grows
exponentially, then non-finite values of every kind (NaN, +Infinity, -Infinity) and floats that only an exact
round trip keeps (a subnormal, 0.1 + 0.2)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["LAYERS", "exploding_trace", "write_trace"]

LAYERS = ["embed.weight", "block.0.weight", "head.weight"]


def _wire(x: float) -> float | str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def exploding_trace(run_id: str, healthy: int = 60, growth: int = 20) -> list[dict[str, Any]]:
    """Header line and step lines; the last step is non-finite."""
    header = {"kind": "run", "run_id": run_id, "family": "test", "config": {"lr": 0.1, "seed": 7},
              "labels": {"outcome": "diverged", "diverged_at": healthy, "spikes": []},
              "meta": {"n_params": 1234, "param_shapes": {name: [4, 4] for name in LAYERS}}}
    lines: list[dict[str, Any]] = [header]
    for s in range(healthy + growth + 1):
        wobble = 1.0 + 0.05 * math.sin(s * 1.7)
        g = wobble if s < healthy else wobble * 3.0 ** (s - healthy + 1)
        layer_g = [g * 0.5, g * 0.7, g * 0.5]
        step: dict[str, Any] = {"kind": "step", "step": s, "loss": 2.0 * 0.99 ** s * wobble, "lr": 0.1,
                                "grad_norm": math.sqrt(sum(x * x for x in layer_g)),
                                "layer_grad_norms": dict(zip(LAYERS, layer_g, strict=True)),
                                "layer_weight_norms": {name: 10.0 + 0.01 * s for name in LAYERS},
                                "update_norm": 0.01 * wobble}
        if s == 3:
            step["loss"], step["lr"] = 0.1 + 0.2, 1e-310
        if s == healthy + growth:
            step["loss"], step["grad_norm"] = math.nan, math.inf
            step["layer_grad_norms"]["head.weight"] = math.inf
            step["layer_weight_norms"]["embed.weight"] = -math.inf
            step["update_norm"] = math.nan
        lines.append({k: ({n: _wire(v) for n, v in val.items()} if isinstance(val, dict) and k != "kind" else
                          _wire(val) if isinstance(val, float) else val) for k, val in step.items()})
    return lines


def write_trace(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line, allow_nan=False) + "\n" for line in lines))
    return path
