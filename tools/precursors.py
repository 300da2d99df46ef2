"""How far ahead can any causal signal see a divergence? Candidate precursors measured on the labelled traces.

    .venv/bin/python tools/precursors.py [--traces ../shared/traces/dev] [--alerts bench/out/gradwatch-dev.jsonl]
    .venv/bin/python tools/precursors.py --model      # also needs `pip install scikit-learn` (not a dependency)

Part 1, one signal at a time: each candidate is computed step by step from what a detector sees (no look
ahead), scale-free. For every healthy run we take its largest value over the whole run, for every run that
diverges at step 10 or later its largest value *before* its divergence step. The level that pages at most two
healthy runs (the scorer's false_alarm 0.034) is the third-largest healthy maximum; the table says how many of
the late-diverging runs pass it in time.

Part 2, candidate rules joined to the shipped detector: the default detector's alerts (`make score` writes
them to bench/out/gradwatch-dev.jsonl) plus one extra critical rule, scored by the scorer itself.

Part 3 (--model): a gradient-boosted classifier over per-step features of all the signals above, trained on
four families and judged on the fifth (leave-one-family-out), its alert level chosen on the training families
for false_alarm <= 0.05 there. If a learned combination cannot separate late divergence from healthy
wildness out of family, no threshold on these signals will.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from gradwatch.replay import read_trace

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")
Series = list[float | None]


def _log(x: Any) -> float | None:
    return math.log(x) if isinstance(x, (int, float)) and math.isfinite(x) and x > 0 else None


def load(traces: str) -> list[dict[str, Any]]:
    """Per run: its header labels and family, and the per-step series the candidates are made of."""
    runs = []
    for name in sorted(os.listdir(traces)):
        if not name.endswith((".jsonl", ".jsonl.gz")):
            continue
        path = os.path.join(traces, name)
        with (gzip.open if name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            header = json.loads(f.readline())
        _, steps = read_trace(path)
        weights = [math.sqrt(sum(v * v for v in s.layer_weight_norms.values()))
                   if isinstance(s.layer_weight_norms, dict) and s.layer_weight_norms
                   and all(isinstance(v, float | int) for v in s.layer_weight_norms.values()) else None
                   for s in steps]
        runs.append({"id": header["run_id"], "family": header["family"], "labels": header["labels"],
                     "loss": [s.loss for s in steps], "g": [s.grad_norm for s in steps],
                     "lr": [s.lr for s in steps], "u": [s.update_norm for s in steps],
                     "w": weights})
    return runs


def ewm(xs: Series, a: float) -> Series:
    out: Series = []
    e = None
    for x in xs:
        if x is not None:
            e = x if e is None else e + a * (x - e)
        out.append(e)
    return out


def above_running_min(xs: Series, after: int = 10) -> Series:
    out: Series = []
    low = None
    for i, x in enumerate(xs):
        if x is not None and i >= after:
            low = x if low is None else min(low, x)
        out.append(None if x is None or low is None else x - low)
    return out


def sustained(xs: Series, k: int) -> Series:
    """The least value over the last k steps (None unless all k are known): a level held, not touched."""
    out: Series = []
    for i in range(len(xs)):
        window = xs[max(0, i - k + 1): i + 1]
        out.append(min(window) if len(window) == k and None not in window else None)  # type: ignore[type-var]
    return out


def log_ratio(r: dict[str, Any]) -> Series:
    return [_log(u / w) if _log(u) is not None and _log(w) is not None else None
            for u, w in zip(r["u"], r["w"], strict=True)]


def log_polyak(r: dict[str, Any]) -> Series:
    """log(update norm x grad norm / loss): the step in units of the Polyak step loss / grad norm."""
    return [_log(u * g / loss) if None not in (_log(u), _log(g), _log(loss)) else None
            for u, g, loss in zip(r["u"], r["g"], r["loss"], strict=True)]


def weight_growth(r: dict[str, Any]) -> Series:
    lw = [_log(w) for w in r["w"]]
    return [None] + [b - a if a is not None and b is not None else None for a, b in zip(lw, lw[1:], strict=False)]


CANDIDATES: dict[str, Callable[[dict[str, Any]], Series]] = {
    "loss above its best (log, EWMA 0.1, held 5 steps)":
        lambda r: sustained(above_running_min(ewm([_log(x) for x in r["loss"]], 0.1)), 5),
    "grad norm above its lowest (log, EWMA 0.1, held 5)":
        lambda r: sustained(above_running_min(ewm([_log(x) for x in r["g"]], 0.1)), 5),
    "update / weight ratio (log, held 5 steps)": lambda r: sustained(log_ratio(r), 5),
    "Polyak multiple of the step (log, held 3 steps)": lambda r: sustained(log_polyak(r), 3),
    "weight norm growth per step (log, held 10 steps)": lambda r: sustained(weight_growth(r), 10),
}


def late(r: dict[str, Any]) -> bool:
    return (r["labels"]["diverged_at"] or 0) >= 10


def separability(runs: list[dict[str, Any]]) -> None:
    print("Part 1: one signal at a time (33 late-diverging runs in dev; level = 3rd-largest healthy maximum)")
    print(f"{'candidate':52s} {'level':>8s} {'late runs past it in time':>26s}   healthy maxima (top 3)")
    for name, fn in CANDIDATES.items():
        healthy, diverging = [], []
        for r in runs:
            s = fn(r)
            labels = r["labels"]
            if labels["diverged_at"] is None:
                healthy.append(max((v for v in s if v is not None), default=-math.inf))
            elif late(r):
                end = min(labels["diverged_at"], labels["nonfinite_at"] or math.inf)
                diverging.append(max((v for v in s[:end] if v is not None), default=-math.inf))
        healthy.sort(reverse=True)
        level = healthy[2]
        caught = sum(v > level for v in diverging)
        print(f"{name:52s} {level:8.3f} {f'{caught} / {len(diverging)}':>26s}   "
              + ", ".join(f"{v:.2f}" for v in healthy[:3]))


def first_streak(flags: Iterator[bool], k: int) -> int | None:
    run = 0
    for t, flag in enumerate(flags):
        run = run + 1 if flag else 0
        if run >= k:
            return t
    return None


def weight_growth_rule(r: dict[str, Any]) -> int | None:
    """Critical once the weight norm has grown at least 12 % on each of 10 consecutive steps (3.1x)."""
    return first_streak((v is not None and v >= math.log(1.12) for v in weight_growth(r)), 10)


def polyak_every_plain_step_rule(r: dict[str, Any]) -> int | None:
    """The shipped first-update Polyak rule applied to every plain gradient step (u <= 1.05 lr g)."""
    def flag(u: Any, w: Any, g: Any, loss: Any, lr: Any) -> bool:
        if None in (_log(u), _log(w), _log(g), _log(loss), _log(lr)):
            return False
        return bool(u <= 1.05 * lr * g and u * g >= 4 * loss and u / w >= 0.1)
    return first_streak((flag(*v) for v in zip(r["u"], r["w"], r["g"], r["loss"], r["lr"], strict=True)), 1)


def scored(traces: str, alert_lines: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("\n".join(alert_lines) + "\n")
    try:
        out = subprocess.run([sys.executable, os.path.join(SHARED, "tools", "score.py"), "--traces", traces,
                              "--alerts", f.name, "--json"], check=True, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    result: dict[str, Any] = json.loads(out.stdout)["results"][0]["all"]
    return result


def joined_rules(runs: list[dict[str, Any]], traces: str, alerts: str) -> None:
    print("\nPart 2: one extra critical rule joined to the default detector's alerts")
    with open(alerts) as f:
        base = [line.strip() for line in f if line.strip()]
    rows = [("defaults", base)]
    for name, rule in (("+ weight norm +12 %/step for 10 steps", weight_growth_rule),
                       ("+ Polyak >= 4 on every plain step (not just the first)", polyak_every_plain_step_rule)):
        extra = [json.dumps({"run_id": r["id"], "step": t, "severity": "critical", "signature": "update_ratio"})
                 for r in runs if (t := rule(r)) is not None]
        rows.append((name, base + extra))
    print(f"{'':58s} {'early':>7s} {'early@10+':>10s} {'lead@10+':>9s} {'false_alarm':>12s}")
    for name, lines in rows:
        m = scored(traces, lines)
        print(f"{name:58s} {m['early_recall']:7.3f} {m['late_early_recall']:10.3f} "
              f"{m['late_lead_median'] or 0:9.1f} {m['false_alarm_rate']:12.3f}")


def step_features(r: dict[str, Any]) -> list[list[float]]:
    """Every candidate's per-step value and a few short-range changes: the learned model's inputs."""
    columns = [fn(r) for fn in CANDIDATES.values()]
    lg = [_log(x) for x in r["g"]]
    ll = [_log(x) for x in r["loss"]]
    llr = [_log(x) for x in r["lr"]]

    def change(xs: Series, k: int) -> Series:
        return [None] * k + [b - a if a is not None and b is not None else None
                             for a, b in zip(xs, xs[k:], strict=False)]

    columns += [change(lg, 1), change(lg, 5), change(ll, 5), change(llr, 10), log_ratio(r), weight_growth(r),
                change(ewm(ll, 0.2), 10)]
    nan = float("nan")
    return [[nan if c[t] is None else c[t] for c in columns] for t in range(len(r["g"]))]  # type: ignore[misc]


def learned(runs: list[dict[str, Any]]) -> None:
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier

    print("\nPart 3: gradient-boosted classifier, leave one family out (positives: the 30 steps before a late "
          "divergence)")
    feats = {r["id"]: np.array(step_features(r)) for r in runs}

    def first_alert(p: Any, level: float) -> int | None:
        return first_streak((bool(v > level) for v in p), 2)

    def rates(group: list[dict[str, Any]], probs: dict[str, Any], level: float) -> tuple[int, int, int, int]:
        fa = sum(first_alert(probs[r["id"]], level) is not None for r in group if r["labels"]["diverged_at"] is None)
        caught = 0
        for r in group:
            t = first_alert(probs[r["id"]], level) if late(r) else None
            caught += t is not None and t < r["labels"]["diverged_at"]
        return (fa, sum(r["labels"]["diverged_at"] is None for r in group), caught, sum(map(late, group)))

    totals = [0, 0, 0, 0]
    for family in sorted({r["family"] for r in runs}):
        train = [r for r in runs if r["family"] != family]
        test = [r for r in runs if r["family"] == family]
        xs, ys = [], []
        for r in train:
            d = r["labels"]["diverged_at"]
            if d is None:
                xs.append(feats[r["id"]][10:])
                ys.append(np.zeros(len(feats[r["id"]]) - 10))
            elif d >= 12:
                lo = max(10, d - 30)
                xs.append(feats[r["id"]][lo:d])
                ys.append(np.ones(d - lo))
        model = HistGradientBoostingClassifier(max_depth=3, max_iter=150, learning_rate=0.05,
                                               class_weight="balanced", random_state=0)
        model.fit(np.vstack(xs), np.concatenate(ys))
        probs = {}
        for r in runs:
            p = model.predict_proba(feats[r["id"]])[:, 1]
            p[:10] = 0.0
            probs[r["id"]] = p
        pooled = np.concatenate([probs[r["id"]] for r in train])
        best = None
        for q in (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999):
            level = float(np.quantile(pooled, q))
            fa, n_healthy, caught, _ = rates(train, probs, level)
            if fa <= 0.05 * n_healthy and (best is None or caught > best[1]):
                best = (level, caught)
        level = best[0] if best else 1.0
        fa, n_healthy, caught, n_late = rates(test, probs, level)
        totals = [a + b for a, b in zip(totals, (fa, n_healthy, caught, n_late), strict=True)]
        print(f"  held out {family:12s} healthy paged {fa} / {n_healthy}   late runs caught early {caught} / {n_late}")
    print(f"  all families          healthy paged {totals[0]} / {totals[1]} ({totals[0] / totals[1]:.3f})   "
          f"late runs caught early {totals[2]} / {totals[3]} ({totals[2] / totals[3]:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", default=os.path.join(SHARED, "traces", "dev"))
    parser.add_argument("--alerts", default=os.path.join(HERE, "..", "bench", "out", "gradwatch-dev.jsonl"),
                        help="the default detector's alerts (make score writes them)")
    parser.add_argument("--model", action="store_true", help="also fit the leave-one-family-out model")
    args = parser.parse_args()
    runs = load(args.traces)
    separability(runs)
    if os.path.exists(args.alerts):
        joined_rules(runs, args.traces, args.alerts)
    else:
        print(f"\n(Part 2 skipped: no {args.alerts}; run `make score` first)")
    if args.model:
        learned(runs)


if __name__ == "__main__":
    main()
