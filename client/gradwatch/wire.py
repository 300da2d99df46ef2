"""The wire encoding of measured values, shared by the client and the service.

Non-finite floats are the signal this product exists for, so they travel as the JSON strings
"NaN", "Infinity" and "-Infinity" (the protobuf JSON convention); a bare NaN token is not JSON.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["NONFINITE_STRINGS", "decode_value", "encode_value", "to_float"]

NONFINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_value(x: float | None) -> float | str | None:
    """A float as it goes on the wire: itself when finite, else its name."""
    if x is None or math.isfinite(x):
        return x
    if x != x:
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"


def decode_value(x: Any) -> float | None:
    """A wire value back to a float; raises ValueError for anything that is not a value."""
    if x is None:
        return None
    if isinstance(x, bool):
        raise ValueError(f"not a number: {x!r}")
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x in NONFINITE_STRINGS:
        return NONFINITE_STRINGS[x]
    raise ValueError(f"not a number: {x!r} (non-finite values are \"NaN\", \"Infinity\", \"-Infinity\")")


def to_float(x: Any) -> float | None:
    """Python floats, ints, numpy scalars and 0-d tensors to a float, without importing numpy or torch."""
    if x is None:
        return None
    if isinstance(x, float):
        return x
    item = getattr(x, "item", None)
    if item is not None:
        x = item()
    return float(x)
