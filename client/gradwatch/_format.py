"""How the command line shows values: numbers to four significant digits, non-finite values by name, a unicode
sparkline on a log scale, and aligned columns."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .wire import decode_value

__all__ = ["BARS", "NONFINITE_MARK", "fmt_value", "sparkline", "table"]

BARS = "▁▂▃▄▅▆▇█"
NONFINITE_MARK = "×"
"""A column of a sparkline that holds a NaN or ±Infinity."""


def fmt_value(v: Any) -> str:
    """A wire value (number, "NaN", "Infinity", "-Infinity" or None) for a person."""
    x = decode_value(v)
    if x is None:
        return "—"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return f"{x:.4g}"


def sparkline(steps: Sequence[int], values: Sequence[Any], width: int, lo: int, hi: int) -> str:
    """`width` characters over steps lo..hi: each the largest value in its span of steps, on a log scale
    (linear when a value is not positive), `×` where the span holds a non-finite value, a space where none."""
    columns: list[float | None] = [None] * width
    bad = [False] * width
    span = max(1, hi - lo + 1)
    for step, raw in zip(steps, values, strict=True):
        x = decode_value(raw)
        if x is None:
            continue
        first = min(width - 1, max(0, (step - lo) * width // span))
        for col in range(first, max(first + 1, min(width, (step + 1 - lo) * width // span))):  # its own columns
            if not math.isfinite(x):
                bad[col] = True
            elif columns[col] is None or x > columns[col]:  # type: ignore[operator]
                columns[col] = x
    filled = [i for i, c in enumerate(columns) if c is not None]
    for a, b in zip(filled, filled[1:], strict=False):  # a short run: hold each value until the next one
        for i in range(a + 1, b):
            if not bad[i]:
                columns[i] = columns[a]
    finite = [c for c in columns if c is not None]
    if not finite:
        return "".join(NONFINITE_MARK if b else " " for b in bad)
    log = min(finite) > 0
    scaled = [None if c is None else (math.log10(c) if log else c) for c in columns]
    known = [s for s in scaled if s is not None]
    low, high = min(known), max(known)
    out = []
    for s, is_bad in zip(scaled, bad, strict=True):
        if is_bad:
            out.append(NONFINITE_MARK)
        elif s is None:
            out.append(" ")
        else:
            out.append(BARS[0 if high == low else min(len(BARS) - 1, int((s - low) / (high - low) * len(BARS)))])
    return "".join(out)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
