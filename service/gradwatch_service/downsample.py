"""Downsampling that keeps explosions visible.

A plain average per bucket hides exactly what this product looks for (one step at 1e6 among 99 at 1.0
averages to 1e4, and NaN poisons the mean), so each bucket keeps its minimum and maximum finite points and
the first NaN, +Infinity and -Infinity it holds, each at its real step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["downsample_minmax"]


def downsample_minmax(
    steps: Sequence[int], values: Sequence[float | None], max_points: int
) -> tuple[list[int], list[float | None]]:
    """At most max_points finite points (two per bucket) plus the first of each non-finite kind per bucket.

    Unmeasured points (None) are dropped when downsampling; steps must be ascending.
    """
    n = len(steps)
    if max_points <= 0:
        raise ValueError("max_points must be positive")
    if n <= max_points:
        return list(steps), list(values)
    n_buckets = max(1, max_points // 2)
    keep: list[int] = []
    for b in range(n_buckets):
        lo, hi = b * n // n_buckets, (b + 1) * n // n_buckets
        i_min = i_max = -1
        v_min, v_max = math.inf, -math.inf
        nonfinite: dict[str, int] = {}
        for i in range(lo, hi):
            v = values[i]
            if v is None:
                continue
            if v != v:
                nonfinite.setdefault("nan", i)
            elif v in (math.inf, -math.inf):
                nonfinite.setdefault("pos" if v > 0 else "neg", i)
            else:
                if v < v_min:
                    v_min, i_min = v, i
                if v > v_max:
                    v_max, i_max = v, i
        picked = {i for i in (i_min, i_max) if i >= 0} | set(nonfinite.values())
        keep.extend(sorted(picked))
    return [steps[i] for i in keep], [values[i] for i in keep]
