"""How fast the detectors are: microseconds per step for one run, in the process that will run them.

    python bench/detect.py            # readable table
    python bench/detect.py --json     # one JSON object (keys below), for CI and the README
    python bench/detect.py --quick    # a few thousand steps: a smoke test, not a measurement

The service ingests about 70,000 steps/s and detection must keep at least 75 % of that, so one step with 50
layers has a budget of about 5 us in CPython 3.11 (one ingested step costs about 14 us end to end). Steps are
built before timing, as the `StepInput`s the callers build (decoding JSON is the ingest path's cost, not the
detector's), and replayed through
`advance` + `track_incidents` on every step, as in the service (it also resolves incidents on quiet steps).
Each measurement is one entry in MEASUREMENTS; add a function there to add a row and a JSON key.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from gradwatch.detect import DetectorConfig, StepInput, advance, held_signatures, new_state
from gradwatch.incidents import new_incident_state, track_incidents


def synthetic_steps(n_steps: int, n_layers: int, seed: int = 0) -> list[dict[str, object]]:
    """A healthy-looking run: log-normal layer grad norms around slowly drifting levels, a spike now and then."""
    rng = random.Random(seed)
    names = [f"blocks.{i // 2}.{'attn' if i % 2 else 'mlp'}.weight" for i in range(n_layers)]
    levels = [rng.uniform(-2.0, 1.0) for _ in names]
    weights = {name: rng.uniform(5.0, 50.0) for name in names}
    steps = []
    for t in range(n_steps):
        spike = 30.0 if rng.random() < 0.002 else 1.0
        grads = {name: spike * math.exp(level + rng.gauss(0.0, 0.4)) for name, level in zip(names, levels, strict=True)}
        steps.append({
            "step": t, "loss": 2.0 * math.exp(-t / 5000.0 + rng.gauss(0.0, 0.1)), "lr": 1e-3,
            "grad_norm": math.sqrt(sum(v * v for v in grads.values())),
            "update_norm": 0.05 * math.exp(rng.gauss(0.0, 0.3)),
            "layer_grad_norms": grads, "layer_weight_norms": weights,
        })
    return steps


def us_per_step(n_layers: int, n_steps: int, repeats: int) -> float:
    """Best of `repeats` passes over one run, in microseconds per step (best-of filters scheduler noise)."""
    steps = [StepInput.of(s) for s in synthetic_steps(n_steps, n_layers)]
    config = DetectorConfig()
    best = math.inf
    for _ in range(repeats):
        state = new_state()
        incidents = new_incident_state()
        started = time.perf_counter()
        for step in steps:
            state, events = advance(state, step, config)
            incidents, _, _ = track_incidents(incidents, events, step.step, config, held_signatures(state))
        best = min(best, time.perf_counter() - started)
    return 1e6 * best / n_steps


@dataclass(frozen=True)
class Measurement:
    key: str
    label: str
    unit: str
    run: Callable[[argparse.Namespace], float]


def _layers(n: int) -> Callable[[argparse.Namespace], float]:
    return lambda args: us_per_step(n, args.steps, args.repeats)


def ingest_ratio_detection_on(args: argparse.Namespace) -> float:
    """End-to-end ingest (bench/ingest.py's set-up, SQLite) with detection on, over the same with it off."""
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ingest import measure

    n_steps = 1_000 if args.quick else 12_500
    pairs = 1 if args.quick else 5
    ratios = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-detect-bench-") as tmp:
        for i in range(pairs):  # back-to-back pairs in alternating order, so drift and noise hit both sides
            order = ("false", "true") if i % 2 == 0 else ("true", "false")
            rate = {d: measure("sqlite", 4, n_steps, 1000, Path(tmp), env={"GRADWATCH_DETECTION": d},
                               raw=False)["values_per_s"] for d in order}
            ratios.append(rate["true"] / rate["false"])
    return statistics.median(ratios)


MEASUREMENTS = [
    Measurement("detect_us_per_step_50_layers", "advance + incidents, 50 layers", "us/step", _layers(50)),
    Measurement("detect_us_per_step_10_layers", "advance + incidents, 10 layers", "us/step", _layers(10)),
    Measurement("detect_us_per_step_no_layers", "advance + incidents, no layer maps", "us/step", _layers(0)),
    Measurement("ingest_ratio_detection_on", "ingest with detection / without (SQLite, 4 clients)", "x",
                ingest_ratio_detection_on),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="small run for CI (numbers are rough)")
    parser.add_argument("--steps", type=int, default=20_000, help="steps per pass (default 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="passes; the best counts (default 5)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 2_000, 1
    results = {m.key: round(m.run(args), 3) for m in MEASUREMENTS}
    if args.json:
        print(json.dumps({**results, "python": platform.python_version(), "steps": args.steps}))
        return 0
    print(f"gradwatch detectors, CPython {platform.python_version()}, {args.steps} steps x {args.repeats}, best pass")
    width = max(len(m.label) for m in MEASUREMENTS)
    for m in MEASUREMENTS:
        print(f"  {m.label.ljust(width)}  {results[m.key]:8.2f} {m.unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
