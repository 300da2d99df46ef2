"""What a change to the detector costs per step: this checkout's `gradwatch.detect` against another version of it.

    git show 2495a52:client/gradwatch/detect.py > /tmp/detect_old.py      # a one-module version (before 12-07)
    .venv/bin/python tools/detect_ab.py --old /tmp/detect_old.py                # wall clock, interleaved pairs
    .venv/bin/python tools/detect_ab.py --old /tmp/detect_old.py --callgrind    # instruction counts (valgrind)

Both versions run `advance` + incident tracking over bench/detect.py's synthetic steps, as bench/detect.py
does. The wall-clock mode loads both modules into one process and times them in interleaved pairs (old, new,
then new, old, ...), each pair on fresh states, and reports the median of the pairs' new / old ratios: noise
from other processes falls on both sides of a pair. On a shared machine even that moves by several per cent,
so `--callgrind` counts the instructions instead, which do not depend on the load: each version runs under
`valgrind --tool=callgrind` over N steps and again with the detector left out (the same start-up, imports and
step building), and the difference over N is its instructions per step.

The other version is one module (detect.py, as it was until the package); it gets the steps as dicts. This
checkout's package gets them as `StepInput`s, built from the same dicts before the loop, as its callers now
build them instead of the dicts: under `--callgrind` its baseline builds them too, and the cost of building
them (`StepInput.of` per step, over the dicts) is printed on its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from detect import synthetic_steps  # noqa: E402  (bench/detect.py: the steps the benchmark uses)

from gradwatch import detect as new_detect  # noqa: E402
from gradwatch import incidents as new_incidents  # noqa: E402

LAYERS = (50, 10, 0)


def load_old(path: str) -> ModuleType:
    """The other version of detect.py as a module of its own (it imports gradwatch.wire etc. as they are now)."""
    spec = importlib.util.spec_from_file_location("gradwatch_detect_old", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def runner(module: ModuleType) -> Any:
    """A function that runs a list of steps through `module`'s detector and incident tracking, fresh states."""
    if module is new_detect:
        advance, held_signatures = new_detect.advance, new_detect.held_signatures
        new_incident_state, track = new_incidents.new_incident_state, new_incidents.track_incidents

        def run(steps: list[Any]) -> None:
            config = new_detect.DetectorConfig()
            state = new_detect.new_state()
            incidents = new_incident_state()
            for step in steps:
                state, events = advance(state, step, config)
                incidents, _, _ = track(incidents, events, step.step, config, held_signatures(state))
        return run
    # the 12-01 module kept its own incident tracking (no holds)
    advance = module.advance
    new_incident_state = getattr(module, "new_incident_state", new_incidents.new_incident_state)
    track = getattr(module, "track_incidents", new_incidents.track_incidents)

    def run_old(steps: list[dict[str, object]]) -> None:
        config = module.DetectorConfig()
        state = module.new_state()
        incidents = new_incident_state()
        for step in steps:
            state, events = advance(state, step, config)
            incidents, _, _ = track(incidents, events, step["step"], config)
    return run_old


def typed(steps: list[dict[str, Any]]) -> list[Any]:
    """The steps as this checkout's callers build them."""
    return [new_detect.StepInput.of(s) for s in steps]


def pairs(old: ModuleType, n_layers: int, n_steps: int, n_pairs: int) -> dict[str, Any]:
    steps = synthetic_steps(n_steps, n_layers)
    inputs = typed(steps)
    run_old, run_new = runner(old), runner(new_detect)
    run_old(steps), run_new(inputs)  # warm both
    ratios, olds, news = [], [], []
    for i in range(n_pairs):
        order = (("old", run_old), ("new", run_new)) if i % 2 == 0 else (("new", run_new), ("old", run_old))
        took = {}
        for name, run in order:
            started = time.perf_counter()
            run(steps if name == "old" else inputs)
            took[name] = time.perf_counter() - started
        ratios.append(took["new"] / took["old"])
        olds.append(1e6 * took["old"] / n_steps)
        news.append(1e6 * took["new"] / n_steps)
    return {"ratio": statistics.median(ratios), "old_us": statistics.median(olds), "new_us": statistics.median(news),
            "ratios": [round(r, 3) for r in ratios]}


def count_instructions(old_path: str, impl: str, n_layers: int, n_steps: int) -> int:
    """Instructions (callgrind's Ir) of one run of this script's `--impl` mode under valgrind."""
    with tempfile.TemporaryDirectory(prefix="detect-ab-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                        "--old", old_path, "--impl", impl, "--layers", str(n_layers), "--steps", str(n_steps)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONHASHSEED": "0"})
        text = Path(out).read_text()
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    assert found, "no instruction total in callgrind's output"
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--old", required=True, help="path of the other version's detect.py")
    parser.add_argument("--callgrind", action="store_true", help="count instructions under valgrind instead")
    parser.add_argument("--steps", type=int, default=3_000, help="steps per pass (default 3000)")
    parser.add_argument("--pairs", type=int, default=15, help="interleaved pairs per layer count (default 15)")
    parser.add_argument("--layers", type=int, nargs="*", default=list(LAYERS), help="layer counts (50 10 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--jobs", type=int, default=4, help="valgrind runs at a time under --callgrind (default 4)")
    parser.add_argument("--impl", choices=("old", "new", "none", "typed"),
                        help=argparse.SUPPRESS)  # one run, for valgrind
    args = parser.parse_args(argv)
    old = load_old(args.old)
    if args.impl is not None:
        steps = synthetic_steps(args.steps, args.layers[0])
        if args.impl in ("new", "typed"):
            steps = typed(steps)
        if args.impl in ("old", "new"):
            runner(old if args.impl == "old" else new_detect)(steps)
        return 0
    results: dict[str, Any] = {}
    counted: dict[tuple[str, int], int] = {}
    if args.callgrind:  # the counts do not depend on the load: run them side by side
        jobs = [(impl, n) for n in args.layers for impl in ("none", "typed", "old", "new")]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for job, total in zip(jobs, pool.map(lambda j: count_instructions(args.old, j[0], j[1], args.steps), jobs),
                                  strict=True):
                counted[job] = total
    for n_layers in args.layers:
        if args.callgrind:
            counts = {impl: counted[(impl, n_layers)] for impl in ("none", "typed", "old", "new")}
            old_per = (counts["old"] - counts["none"]) / args.steps
            new_per = (counts["new"] - counts["typed"]) / args.steps
            results[str(n_layers)] = {"old_instr": round(old_per), "new_instr": round(new_per),
                                      "ratio": round(new_per / old_per, 4),
                                      "input_instr": round((counts["typed"] - counts["none"]) / args.steps)}
        else:
            results[str(n_layers)] = pairs(old, n_layers, args.steps, args.pairs)
    if args.json:
        print(json.dumps(results))
        return 0
    unit = "instructions/step" if args.callgrind else "us/step (median)"
    print(f"detect: this checkout / {args.old}, {args.steps} steps, {unit}")
    for n_layers, r in results.items():
        if args.callgrind:
            print(f"  {n_layers:>3} layers  old {r['old_instr']:>8}  new {r['new_instr']:>8}  new/old {r['ratio']:.3f}"
                  f"  (building the StepInputs {r['input_instr']})")
        else:
            print(f"  {n_layers:>3} layers  old {r['old_us']:6.2f}  new {r['new_us']:6.2f}  new/old {r['ratio']:.3f}"
                  f"  (pairs {min(r['ratios']):.3f}-{max(r['ratios']):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
