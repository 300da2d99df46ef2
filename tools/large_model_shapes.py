"""Synthetic traces of what real large-model trouble looks like (../shared/DESIGN.md), for tests and for the scorer.

    .venv/bin/python tools/large_model_shapes.py --out bench/out/shapes     # one labelled trace per shape
    python3 ../shared/tools/score.py bench/out/shapes alerts.jsonl

Real large-model logs carry a loss, often a total grad norm, and no per-layer norms; so do these. Each shape is
a function of a seed that returns (header, steps) in the labelled traces' format (../shared/traces/README.md):

- `grad_climb`: BLOOM-176B's iterations 31214-31222 — a grad norm flat for hundreds of steps, then x4, x2.5,
  x6.6, x9, x6.6 on consecutive steps while the loss stays put, then the loss jumps. A detector must page by
  the third step of the climb (`CLIMB_CRITICAL_BY`).
- `spiky_healthy`: the healthy GPT-2 124M run — grad-norm spikes of 2-15x its median on single steps, gone
  the next step, in a slowly falling loss. A warning at most.
- `resume_jump`: Pythia 410m after a resume, loss only — 2.2 to 11 in one step, recovering over thousands.
  Page within two steps.
- `nan_from_start`: a run whose loss and grad norm are NaN from its first step. Page at that step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Callable
from typing import Any

Trace = tuple[dict[str, Any], list[dict[str, Any]]]

CLIMB_AT = 600
CLIMB_FACTORS = (4.0, 2.5, 6.6, 9.1, 6.6)  # 0.24 -> 0.95 -> 2.39 -> 15.9 -> 145 -> 960
CLIMB_CRITICAL_BY = CLIMB_AT + 2  # "critical by the third step of the climb"
JUMP_AT = 2000


def _spell(v: float | None) -> float | str | None:
    if v is None or math.isfinite(v):
        return None if v is None else round(v, 6)
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def _step(t: int, loss: float | None, grad: float | None, lr: float | None = 3e-4) -> dict[str, Any]:
    return {"kind": "step", "step": t, "loss": _spell(loss), "grad_norm": _spell(grad), "lr": lr}


def _header(run_id: str, steps: list[dict[str, Any]], diverged_at: int | None,
            nonfinite_at: int | None = None) -> dict[str, Any]:
    return {"kind": "run", "run_id": run_id, "family": "large-model-shape",
            "config": {"generator": "tools/large_model_shapes.py"},
            "labels": {"outcome": "healthy" if diverged_at is None else "diverged", "diverged_at": diverged_at,
                       "nonfinite_at": nonfinite_at, "spikes": []},
            "meta": {"n_steps": len(steps)}}


def grad_climb(seed: int = 0) -> Trace:
    """Flat grad norm (0.24, 10 % noise) and loss (2.3) for CLIMB_AT steps, then the BLOOM climb, then the loss
    jumps to 5 and the grad norm stays in the hundreds."""
    rng = random.Random(seed)
    steps = [_step(t, 2.3 * math.exp(rng.gauss(0, 0.02)), 0.24 * math.exp(rng.gauss(0, 0.1)))
             for t in range(CLIMB_AT)]
    g = 0.24
    for k, factor in enumerate(CLIMB_FACTORS):
        g *= factor
        steps.append(_step(CLIMB_AT + k, 2.2 + 0.15 * rng.random(), g))
    for t in range(CLIMB_AT + len(CLIMB_FACTORS), CLIMB_AT + 40):
        steps.append(_step(t, 5.1 * math.exp(rng.gauss(0, 0.05)), 300 * math.exp(rng.gauss(0, 0.5))))
    return _header(f"shape-grad-climb-{seed}", steps, CLIMB_AT), steps


def spiky_healthy(seed: int = 0, n: int = 4000) -> Trace:
    """A healthy pretraining run: loss falling from 4 to 3.2, grad norm 0.3 with 15 % noise, and every 50-150
    steps a single-step spike of 2-15x that is gone the next step (the loss of that step up a few per cent)."""
    rng = random.Random(seed)
    steps = []
    next_spike = rng.randint(50, 150)
    for t in range(n):
        loss = (3.2 + 0.8 * math.exp(-t / 800)) * math.exp(rng.gauss(0, 0.01))
        g = 0.3 * math.exp(rng.gauss(0, 0.15))
        if t == next_spike:
            g *= rng.uniform(2.0, 15.0)
            loss *= 1.03
            next_spike = t + rng.randint(50, 150)
        steps.append(_step(t, loss, g))
    return _header(f"shape-spiky-healthy-{seed}", steps, None), steps


def resume_jump(seed: int = 0) -> Trace:
    """Loss only (no grad norm): 2.2 with 1 % noise for JUMP_AT steps, then 11 at once, recovering slowly."""
    rng = random.Random(seed)
    steps = [_step(t, 2.2 * math.exp(rng.gauss(0, 0.01)), None, None) for t in range(JUMP_AT)]
    for k in range(300):
        steps.append(_step(JUMP_AT + k, (2.2 + 8.8 * math.exp(-k / 400)) * math.exp(rng.gauss(0, 0.01)), None, None))
    return _header(f"shape-resume-jump-{seed}", steps, JUMP_AT), steps


def nan_from_start(seed: int = 0) -> Trace:
    """Loss and grad norm NaN from the first step (a bad initialisation, or a corrupt checkpoint)."""
    steps = [_step(0, math.nan, math.nan)]
    return _header(f"shape-nan-from-start-{seed}", steps, 0, 0), steps


SHAPES: dict[str, Callable[[int], Trace]] = {
    "grad-climb": grad_climb, "spiky-healthy": spiky_healthy, "resume-jump": resume_jump,
    "nan-from-start": nan_from_start,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write <run_id>.jsonl into")
    parser.add_argument("--seeds", type=int, default=3, help="traces per shape (default 3)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for make in SHAPES.values():
        for seed in range(args.seeds):
            header, steps = make(seed)
            with open(os.path.join(args.out, f"{header['run_id']}.jsonl"), "w") as f:
                for line in (header, *steps):
                    f.write(json.dumps(line) + "\n")
    print(f"wrote {len(SHAPES) * args.seeds} traces to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
