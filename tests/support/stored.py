"""What a live gradwatch server stored for a run, read through its query API, values as floats."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from gradwatch.wire import LAYER_FIELDS, decode_value

__all__ = ["incidents", "stored_steps"]


def stored_steps(url: str, run_id: str) -> list[dict[str, Any]]:
    """The run's steps in order; per-layer fields as {layer: float}, NaN and ±inf as floats."""
    with urllib.request.urlopen(f"{url}/v1/runs/{run_id}/steps?limit=100000", timeout=10) as r:
        page = json.loads(r.read())
    layers = page["layers"]
    out = []
    for step in page["steps"]:
        plain = dict(step)
        for key in ("loss", "grad_norm", "lr", "update_norm"):
            plain[key] = decode_value(step[key]) if step.get(key) is not None else None
        for key in LAYER_FIELDS:
            row = step.get(key)
            plain[key] = {n: decode_value(v) for n, v in zip(layers, row, strict=True) if v is not None} if row else {}
        out.append(plain)
    return out


def incidents(url: str, run_id: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/v1/runs/{run_id}/incidents", timeout=10) as r:
        found: list[dict[str, Any]] = json.loads(r.read())["incidents"]
    return found
