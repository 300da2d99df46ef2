"""Leave one family out: the honest forecast of how the detector does on model families it was not tuned on.

    .venv/bin/python tools/lofo.py [--traces ../shared/traces/dev] [--scorer ../shared/tools/score.py]

The held-out traces come from other model families than dev's. To forecast how settings chosen on dev will do
there, each family in turn is held out: a setting is chosen from GRID on the other four (the highest by+5 with
false_alarm <= MAX_FALSE_ALARM there; ties go to the lower delay_med, then to the defaults), and scored on the
held-out family. The defaults are scored on every family beside it (in-sample: they were chosen on all five).
The last rows pool the held-out families' alerts (each family under the setting chosen without it) and score
them as one set, next to the defaults on the same runs: the gap between the two is what tuning on dev buys
that does not travel. docs/detection.md keeps the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from gradwatch.detect import DetectorConfig
from gradwatch.replay import read_trace, replay_run, trace_paths

REPO = Path(__file__).resolve().parents[1]
GRID: dict[str, tuple[Any, ...]] = {
    "loss_jump_z": (4.0, 5.0, 6.0, 8.0),
    "loss_jump_factor": (1.5, 2.0, 3.0),
    "growth_rising_steps": (2, 3),
    "growth_layer_z": (4.0, 5.0),
}
MAX_FALSE_ALARM = 0.03


def load_scorer(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("score", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["score"] = module
    spec.loader.exec_module(module)
    return module


def alerts_for(config: DetectorConfig, traces: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {run_id: list(replay_run(run_id, steps, config)) for run_id, steps in traces.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--traces", default=str(REPO.parent / "shared" / "traces" / "dev"))
    parser.add_argument("--scorer", default=str(REPO.parent / "shared" / "tools" / "score.py"))
    args = parser.parse_args()
    scorer = load_scorer(args.scorer)
    runs = scorer.load_runs(args.traces)
    family = {r.run_id: r.family for r in runs}
    traces = dict(read_trace(p) for p in trace_paths(args.traces))
    families = sorted(set(family.values()))
    default = DetectorConfig()
    names = list(GRID)
    candidates = [dict(zip(names, values, strict=True)) for values in itertools.product(*GRID.values())]
    print(f"{len(candidates)} settings x {len(traces)} runs ...", file=sys.stderr)
    by_setting: list[tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]] = []
    for setting in candidates:
        by_setting.append((setting, alerts_for(dataclasses.replace(default, **setting), traces)))
    default_alerts = alerts_for(default, traces)

    def score(alerts: dict[str, list[dict[str, Any]]], fams: set[str]) -> dict[str, Any]:
        chosen = [r for r in runs if r.family in fams]
        return scorer.score(chosen, [a for r in chosen for a in alerts.get(r.run_id, [])])  # type: ignore[no-any-return]

    def rank(s: dict[str, Any], setting: dict[str, Any]) -> tuple[float, float, int]:
        delay = s["delay_median"] if s["delay_median"] is not None else 1e9
        distance = sum(setting[k] != getattr(default, k) for k in setting)
        return (-s["caught_by5"], delay, distance)

    print(f"{'held out':<12} {'setting chosen on the other four':<64} "
          f"{'by+5':>6} {'delay':>6} {'FA':>6}   defaults: {'by+5':>6} {'delay':>6} {'FA':>6}")
    pooled: dict[str, list[dict[str, Any]]] = {}
    for held in families:
        train = set(families) - {held}
        scored = [(setting, alerts, score(alerts, train)) for setting, alerts in by_setting]
        ok = [x for x in scored if (x[2]["false_alarm_rate"] or 0.0) <= MAX_FALSE_ALARM] or scored
        setting, alerts, _ = min(ok, key=lambda x: rank(x[2], x[0]))
        out, dflt = score(alerts, {held}), score(default_alerts, {held})
        pooled.update({r.run_id: alerts.get(r.run_id, []) for r in runs if r.family == held})
        changed = " ".join(f"{k}={v:g}" for k, v in setting.items() if v != getattr(default, k)) or "the defaults"
        print(f"{held:<12} {changed:<64} {_row(out)}             {_row(dflt)}")
    all_fams = set(families)
    held_out, dflt = score(pooled, all_fams), score(default_alerts, all_fams)
    print(f"{'pooled':<12} {'each family under the setting chosen without it':<64} {_row(held_out)}             "
          f"{_row(dflt)}")
    return 0


def _row(s: dict[str, Any]) -> str:
    return f"{_fmt(s['caught_by5'])} {_fmt(s['delay_median'])} {_fmt(s['false_alarm_rate'])}"


def _fmt(v: float | None) -> str:
    return f"{v:6.3f}" if v is not None else f"{'-':>6}"


if __name__ == "__main__":
    raise SystemExit(main())
