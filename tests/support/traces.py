"""The labelled training traces and their scorer, which live beside the repository in ../shared, not in it.

A test that replays real traces calls `require_labelled_traces()` first: it skips where ../shared is missing,
except with CI=true, where that fails the run (tests/support/requirements.py), as a missing PostgreSQL does.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .requirements import unavailable

__all__ = ["SHARED", "LabelledTraces", "require_labelled_traces"]

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


class LabelledTraces(NamedTuple):
    dev: Path  # the labelled dev traces, one <run_id>.jsonl each
    scorer: Path  # the scorer every detector is judged by (`score.py TRACES ALERTS --json`)


def require_labelled_traces() -> LabelledTraces:
    traces = LabelledTraces(dev=SHARED / "traces" / "dev", scorer=SHARED / "tools" / "score.py")
    missing = [str(p) for p in (traces.dev, traces.scorer) if not p.exists()]
    if missing:
        unavailable("labelled traces", f"not found next to the repository: {', '.join(missing)}")
    return traces
