"""How much can gradwatch's critical tests catch with no false alarm at all on dev? The ceiling, measured.

    .venv/bin/python tools/fa0_ceiling.py [--traces ../shared/traces/dev] [--scorer ../shared/tools/score.py]
    .venv/bin/python tools/fa0_ceiling.py --json

Why: dominating the `nan_only` baseline (by+5 0.033 at false_alarm 0) needs false_alarm 0 on dev, and issue #20
asks for that together with by+5 >= 0.59. This tool says whether any thresholds of the detector's critical tests
can do both, instead of guessing from a grid.

Every critical test of `gradwatch.detect` is a monotone statistic against a threshold: it fires at a step when the
statistic (for a persistence test, its minimum over the consecutive steps the test needs) reaches the threshold.
The statistics are read from the real detector, step by step: each trace is replayed through `advance` with every
critical threshold out of reach (so that no hold, frozen band or restarted smoothing ever changes what comes
next), and the tests' own inputs are recorded where the detector computes them (`track_breakouts`,
`grad_growth`, `loss_divergence`, `early_ratio` are wrapped, not rewritten). Before its first critical event a
detector's state does not depend on its critical thresholds, so these statistics are exactly what a detector with
any thresholds sees up to its first page; and the score only ever looks at the first page.

For each test, the lowest threshold that keeps every healthy dev run silent is just above the largest value of its
statistic over every step of every healthy run (the table names the run that sets it). All tests at those
thresholds at once is the most sensitive detector of this family with false_alarm 0; a test can only fire later
at a higher threshold, so its by+5 is an upper bound on by+5 at false_alarm 0 for any setting of these thresholds.
It is a real `DetectorConfig`: the tool replays it through the detector and scores it to check.

Tests with two thresholds (give-back: share and least progress; loss jump: deviations and factor; network-wide
climb: deviations and factor; Polyak: multiple and least ratio) also get the bound over *every* pair of their
thresholds: a step of a diverged run can fire under some pair that keeps every healthy run silent only if no
healthy step has both of its statistics at least as high (Pareto dominance); the earliest such step per run is
the "any thresholds" row. Persistence counts, band memories, the climb's start (`growth_z`) and the other shape
settings stay at their defaults. Non-finite values are critical for every detector, the baselines too.

The defaults are rebuilt from the same statistics and must page at the same first step as the detector itself on
every run (checked; the detector's own row is `make score`'s gradwatch row). Last, score.py's baselines: their
points, whether each pages the one healthy run that costs the most (dev-039-rnn), and whether the false-alarm-0
ceiling dominates it. docs/detection.md keeps the table.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from gradwatch.detect import CRITICAL, DetectorConfig, StepInput, advance, held_signatures, new_state
from gradwatch.detect import detector as _detector
from gradwatch.detect import ratio as _ratio
from gradwatch.incidents import new_incident_state, track_incidents
from gradwatch.replay import read_trace, trace_paths

REPO = Path(__file__).resolve().parents[1]
COSTLY_RUN = "dev-039-rnn"
INF = math.inf
NEG = -math.inf
_PLAIN_STEP_TOLERANCE = _ratio._PLAIN_STEP_TOLERANCE

# every critical threshold out of reach: the detector keeps learning as if nothing ever fired. The screen that
# decides whether `grad_growth` runs on a step stays as it is (growth_layer_min_factor is untouched; the
# network-wide test is silenced by its persistence count instead).
SILENT: dict[str, Any] = dict(
    loss_factor=INF, loss_giveback_min_progress=INF, loss_jump_factor=INF, growth_min_factor=INF,
    growth_layer_steps=10**9, ratio_critical=INF, ratio_sustained=INF, ratio_gradient_step=INF, polyak_limit=0.0)


@dataclasses.dataclass(frozen=True)
class Test:
    """One critical test: its statistics (component 0 is the one its main threshold applies to), how each is
    compared with its threshold, and the `DetectorConfig` field of the main threshold."""

    name: str
    what: str
    field: str  # the DetectorConfig field of component 0
    log_field: bool  # component 0 is the log of the field's value
    components: tuple[str, ...]
    strict: tuple[bool, ...]  # True: fires when above the threshold; False: at or above it

    def defaults(self, cfg: DetectorConfig) -> tuple[float, ...]:
        return DEFAULT_THRESHOLDS[self.name](cfg)

    def to_field(self, t: float) -> float:
        return math.exp(t) if self.log_field else t


TESTS = (
    Test("loss_above_start", "smoothed loss above F x its early level, 5 steps", "loss_factor", True,
         ("log(smoothed loss / early level)",), (True,)),
    Test("loss_giveback", "slow loss gave back share S of progress >= P, 5 steps", "loss_giveback_share", False,
         ("share given back", "log progress"), (False, False)),
    Test("loss_jump", "loss z deviations and F x above its band, 2 steps", "loss_jump_z", False,
         ("deviations above band", "log(loss / band)"), (False, False)),
    Test("grad_growth_climb", "grad norm F x its band after a 4-step (or 3 rising) climb", "growth_min_factor",
         True, ("log(grad norm / band at climb start)",), (False,)),
    Test("grad_growth_network", "layers' geometric mean z dev. and it and grad norm F x bands, 2 steps",
         "growth_layer_z", False, ("gmean deviations above band", "log(least factor over band)"), (False, False)),
    Test("ratio_critical", "an update R x the weight norm, first 20 updates", "ratio_critical", False,
         ("update / weight",), (False,)),
    Test("ratio_sustained", "2 updates in a row R x the weight norm, first 20 updates", "ratio_sustained", False,
         ("least update / weight of 2",), (False,)),
    Test("ratio_gradient_step", "first update a plain gradient step R x the weight norm", "ratio_gradient_step",
         False, ("update / weight",), (False,)),
    Test("ratio_polyak", "plain first step k x the Polyak step, moving weights >= r", "polyak_limit", False,
         ("update x grad / loss", "update / weight"), (False, False)),
)
BY_NAME = {t.name: t for t in TESTS}
DEFAULT_THRESHOLDS: dict[str, Callable[[DetectorConfig], tuple[float, ...]]] = {
    "loss_above_start": lambda c: (math.log(c.loss_factor),),
    "loss_giveback": lambda c: (c.loss_giveback_share, math.log(c.loss_giveback_min_progress)),
    "loss_jump": lambda c: (c.loss_jump_z, math.log(c.loss_jump_factor)),
    "grad_growth_climb": lambda c: (math.log(c.growth_min_factor),),
    "grad_growth_network": lambda c: (c.growth_layer_z, math.log(c.growth_layer_min_factor)),
    "ratio_critical": lambda c: (c.ratio_critical,),
    "ratio_sustained": lambda c: (c.ratio_sustained,),
    "ratio_gradient_step": lambda c: (c.ratio_gradient_step,),
    "ratio_polyak": lambda c: (c.polyak_limit, c.polyak_min_ratio),
}

Stats = dict[str, list[tuple[int, tuple[float, ...]]]]  # test -> (step, statistics) wherever it is judged


# --------------------------------------------------------------------------------------------- the statistics

@contextlib.contextmanager
def _recording(rec: dict[str, Any]) -> Iterator[None]:
    """Wrap the detector's test functions (module globals, restored after) so that each call leaves its inputs
    and the state it leaves behind in `rec`."""
    where = ((_detector, "track_breakouts"), (_detector, "grad_growth"), (_detector, "loss_divergence"),
             (_ratio, "early_ratio"))
    orig = tuple(getattr(module, name) for module, name in where)

    def track_breakouts(state: dict[str, Any], *args: Any) -> float | None:
        gm: float | None = orig[0](state, *args)
        rec["gm"] = (gm, state["m_n"], state["m_mu"], state["m_dev"])  # after a realignment reset the band
        return gm

    def grad_growth(state: dict[str, Any], events: list[Any], step: StepInput, x: float, *args: Any) -> None:
        orig[1](state, events, step, x, *args)
        rec["growth"].append((step.step, x, state["gr_n"], state["gr_rise"], state["gr_base"]))

    def loss_divergence(state: dict[str, Any], events: list[Any], held: Any, step: StepInput, loss: float,
                        cfg: DetectorConfig) -> None:
        pre = (state["l_n"], state["lj_n"], state["lj_mu"], state["lj_dev"])
        orig[2](state, events, held, step, loss, cfg)
        rec["loss"].append((step.step, math.log(loss), *pre, state["l_ewm"], state["l_start"], state["l_slow"],
                            state["l_best"]))

    def early_ratio(state: dict[str, Any], step: StepInput, cfg: DetectorConfig, t: int, n: int, ratio: float,
                    u: float, g: float | None, loss: float | None) -> Any:
        rec["ratio"].append((t, n, ratio, u, g, loss, step.lr))
        return orig[3](state, step, cfg, t, n, ratio, u, g, loss)

    for (module, name), wrapper in zip(where, (track_breakouts, grad_growth, loss_divergence, early_ratio),
                                       strict=True):
        setattr(module, name, wrapper)
    try:
        yield
    finally:
        for (module, name), function in zip(where, orig, strict=True):
            setattr(module, name, function)


def statistics(steps: list[StepInput], base: DetectorConfig | None = None) -> tuple[Stats, int | None]:
    """Each critical test's statistics at every step where the detector judges it, and the first non-finite
    step (None if none), from one pass of the detector with every critical threshold out of reach. Steps after
    the first non-finite one are left out: every detector has paged by then."""
    cfg = dataclasses.replace(base or DetectorConfig(), **SILENT)
    floor, warmup = cfg.band_dev_floor, cfg.warmup_steps
    rec: dict[str, Any] = {"growth": [], "loss": [], "ratio": []}
    wide: list[tuple[int, tuple[float, ...]]] = []  # each step that reaches the grad norm tests: (step, (z, factor))
    nonfinite_at = None
    state = new_state()
    with _recording(rec):
        for step in steps:
            pre_n, mu = state["g_n"], state["g_mu"]
            rec["gm"] = None
            state, events = advance(state, step, cfg)
            if any(e.severity == CRITICAL for e in events):
                assert all(e.signature == "nonfinite" for e in events if e.severity == CRITICAL), events
                nonfinite_at = step.step
                break
            g = step.grad_norm
            if step.skipped or g is None or not g > 0.0 or pre_n < warmup:
                continue
            x = math.log(g)
            a = b = NEG
            if rec["gm"] is not None and rec["gm"][0] is not None and rec["gm"][1] >= warmup:
                gm, _, m_mu, m_dev = rec["gm"]
                dm = gm - m_mu
                a, b = dm / (m_dev if m_dev > floor else floor), min(x - mu, dm)
            wide.append((step.step, (a, b)))
    stats: Stats = {t.name: [] for t in TESTS}
    stats["grad_growth_network"] = _window(wide, (base or DetectorConfig()).growth_layer_steps)
    growth = stats["grad_growth_climb"]
    for t, x, n, rise, gbase in rec["growth"]:
        if n >= cfg.growth_steps or (n and rise >= cfg.growth_rising_steps):
            growth.append((t, (x - gbase,)))
    above: list[tuple[int, tuple[float, ...]]] = []
    giveback: list[tuple[int, tuple[float, ...]]] = []
    jump = stats["loss_jump"]
    loss = rec["loss"]
    for i, (t, _, l_n, _, _, _, ewm, start, slow, best) in enumerate(loss):
        above.append((t, (ewm - start if l_n >= cfg.loss_start_steps else NEG,)))
        if l_n >= warmup:
            progress = start - best
            giveback.append((t, ((slow - best) / progress if progress > 0.0 else NEG,
                                 progress if progress > 0.0 else NEG)))
        k = i - (cfg.loss_jump_steps - 1)
        if k >= 0 and loss[k][3] >= warmup:  # the jump's band is the one held at its first step
            j_mu, j_dev = loss[k][4], loss[k][5]
            up = min(row[1] for row in loss[k:i + 1]) - j_mu
            jump.append((t, (up / (j_dev if j_dev > floor else floor), up)))
    stats["loss_above_start"] = _window(above, cfg.loss_steps)
    stats["loss_giveback"] = _window(giveback, cfg.loss_steps)
    ratios = rec["ratio"]
    for i, (t, n, r, u, g, loss_v, lr) in enumerate(ratios):
        stats["ratio_critical"].append((t, (r,)))
        if i >= 1:  # consecutive updates (every judged one before the band warms up goes through early_ratio)
            stats["ratio_sustained"].append((t, (min(r, ratios[i - 1][2]),)))
        plain = (n == 0 and lr is not None and g is not None and lr > 0.0 and g > 0.0
                 and u <= _PLAIN_STEP_TOLERANCE * lr * g)
        if plain:
            stats["ratio_gradient_step"].append((t, (r,)))
            if loss_v is not None and 0.0 < loss_v < INF:
                stats["ratio_polyak"].append((t, (u * g / loss_v, r)))
    return stats, nonfinite_at


def _window(rows: list[tuple[int, tuple[float, ...]]], k: int) -> list[tuple[int, tuple[float, ...]]]:
    """A persistence test's statistics: each component's least value over the last `k` judged steps."""
    out: list[tuple[int, tuple[float, ...]]] = []
    vals = [r[1] for r in rows]
    for i in range(k - 1, len(rows)):
        win = vals[i - k + 1:i + 1]
        out.append((rows[i][0], tuple(min(v[c] for v in win) for c in range(len(win[0])))))
    return out


# --------------------------------------------------------------------------------------------- firing

def _passes(v: float, t: float, strict: bool) -> bool:
    return v > t if strict else v >= t


def first_fire(stats: Stats, nonfinite_at: int | None, rule: Callable[[Test, tuple[float, ...]], bool]
               ) -> int | None:
    """The first step at which any test fires under `rule` (or the run goes non-finite)."""
    first = nonfinite_at
    for test in TESTS:
        for t, v in stats[test.name]:
            if first is not None and t >= first:
                break
            if rule(test, v):
                first = t
                break
    return first


def at_thresholds(thresholds: dict[str, tuple[float, ...]]) -> Callable[[Test, tuple[float, ...]], bool]:
    return lambda test, v: all(_passes(x, t, s) for x, t, s in zip(v, thresholds[test.name], test.strict,
                                                                      strict=True))


def healthy_max(runs: dict[str, tuple[Stats, int | None]], healthy: list[str], cfg: DetectorConfig
                ) -> dict[str, tuple[float, str | None, int | None]]:
    """Per test: the largest main statistic over every step of the healthy runs where the test's other
    statistics pass their defaults, the run and step that hold it."""
    out = {}
    for test in TESTS:
        rest = test.defaults(cfg)[1:]
        best: tuple[float, str | None, int | None] = (NEG, None, None)
        for run_id in healthy:
            for t, v in runs[run_id][0][test.name]:
                if v[0] > best[0] and all(_passes(x, d, s) for x, d, s in zip(v[1:], rest, test.strict[1:],
                                                                                 strict=True)):
                    best = (v[0], run_id, t)
        out[test.name] = best
    return out


def ceiling_thresholds(maxima: dict[str, tuple[float, str | None, int | None]], cfg: DetectorConfig
                       ) -> tuple[dict[str, tuple[float, ...]], Callable[[Test, tuple[float, ...]], bool]]:
    """Each main threshold just above the healthy maximum (the others at their defaults), and its rule."""
    thr = {t.name: (maxima[t.name][0], *t.defaults(cfg)[1:]) for t in TESTS}

    def rule(test: Test, v: tuple[float, ...]) -> bool:
        th = thr[test.name]
        return v[0] > th[0] and all(_passes(x, d, s) for x, d, s in zip(v[1:], th[1:], test.strict[1:],
                                                                          strict=True))
    return thr, rule


def _only(test: Test, rule: Callable[[Test, tuple[float, ...]], bool]) -> Callable[[Test, tuple[float, ...]], bool]:
    return lambda t, v: t is test and rule(t, v)


def pareto_rule(runs: dict[str, tuple[Stats, int | None]], healthy: list[str]
                ) -> Callable[[Test, tuple[float, ...]], bool]:
    """Fires wherever some setting of the test's thresholds would and still keeps every healthy run silent: the
    step's statistics are not all matched or beaten by those of one healthy step."""
    fronts: dict[str, tuple[list[float], list[float]]] = {}
    for test in TESTS:
        pts = [v for run_id in healthy for _, v in runs[run_id][0][test.name] if all(x > NEG for x in v)]
        if len(test.components) == 1:
            fronts[test.name] = ([max((p[0] for p in pts), default=NEG)], [])
            continue
        # the healthy maxima: sorted by the first statistic, the best second statistic at or above each
        pts.sort()
        xs = [p[0] for p in pts]
        suffix = [NEG] * (len(pts) + 1)
        for i in range(len(pts) - 1, -1, -1):
            suffix[i] = max(suffix[i + 1], pts[i][1])
        fronts[test.name] = (xs, suffix)

    def rule(test: Test, v: tuple[float, ...]) -> bool:
        if not all(x > NEG for x in v):
            return False
        xs, suffix = fronts[test.name]
        if len(v) == 1:
            return v[0] > xs[0]
        i = bisect.bisect_left(xs, v[0])  # healthy steps with a first statistic >= this step's
        return not suffix[i] >= v[1]
    return rule


# --------------------------------------------------------------------------------------------- scoring

def load_scorer(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("score", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["score"] = module
    spec.loader.exec_module(module)
    return module


def detector_first_critical(steps: list[StepInput], cfg: DetectorConfig) -> int | None:
    """The step of the first critical page the real detector, with `cfg`, sends for the run (as replay does)."""
    state, incidents = new_state(), new_incident_state()
    for step in steps:
        state, events = advance(state, step, cfg)
        incidents, opened, _ = track_incidents(incidents, events, step.step, cfg, held_signatures(state))
        if any(inc["severity"] == CRITICAL for inc in opened):
            return step.step
    return None


def scored(scorer: ModuleType, runs: list[Any], first: dict[str, int | None]) -> dict[str, Any]:
    alerts = [{"run_id": r, "step": t, "severity": "critical", "signature": "x"} for r, t in first.items()
              if t is not None]
    s = scorer.score(runs, alerts)
    paged = sorted(r.run_id for r in runs if r.outcome != "diverged" and first.get(r.run_id) is not None)
    return {"by5": s["caught_by5"], "delay_med": s["delay_median"], "false_alarm": s["false_alarm_rate"],
            "healthy_paged": paged}


def measure(traces: str, scorer_path: str, replay: bool = True) -> dict[str, Any]:
    scorer = load_scorer(scorer_path)
    labelled = scorer.load_runs(traces)
    trace = dict(read_trace(p) for p in trace_paths(traces))
    runs = {run_id: statistics(steps) for run_id, steps in trace.items()}
    default = DetectorConfig()
    healthy = [r.run_id for r in labelled if r.outcome != "diverged"]
    rows: dict[str, dict[str, Any]] = {}
    first = {r: first_fire(*runs[r], at_thresholds({t.name: t.defaults(default) for t in TESTS})) for r in runs}
    rows["non-finite values only (gradwatch's test)"] = scored(
        scorer, labelled, {r: first_fire(*runs[r], lambda t, v: False) for r in runs})
    rows["defaults, rebuilt from the statistics"] = scored(scorer, labelled, first)
    mismatch = []
    if replay:
        real = {r: detector_first_critical(steps, default) for r, steps in trace.items()}
        rows["defaults, the detector itself"] = scored(scorer, labelled, real)
        mismatch = sorted(r for r in runs if real[r] != first[r])
    out: dict[str, Any] = {"traces": traces, "runs": len(labelled), "healthy": len(healthy),
                           "diverged": len(labelled) - len(healthy), "defaults_mismatch": mismatch, "sets": {}}
    for key, pool in (("all healthy", healthy), (f"without {COSTLY_RUN}", [r for r in healthy if r != COSTLY_RUN])):
        maxima = healthy_max(runs, pool, default)
        thr, rule = ceiling_thresholds(maxima, default)
        one = {r: first_fire(*runs[r], rule) for r in runs}
        pareto = pareto_rule(runs, pool)
        anyt = {r: first_fire(*runs[r], pareto) for r in runs}
        alone = {}
        for test in TESTS:  # what each test catches by itself at its ceiling (with the non-finite test)
            solo = {r: first_fire(*runs[r], _only(test, rule)) for r in runs}
            alone[test.name] = scored(scorer, labelled, solo)["by5"]
        entry: dict[str, Any] = {
            "thresholds": {t.name: {"field": t.field, "default": getattr(default, t.field),
                                    "ceiling": None if maxima[t.name][0] == NEG else t.to_field(thr[t.name][0]),
                                    "set_by": maxima[t.name][1], "at_step": maxima[t.name][2],
                                    "by5_alone": alone[t.name]} for t in TESTS},
            "one_threshold_each": scored(scorer, labelled, one),
            "any_thresholds": scored(scorer, labelled, anyt),
        }
        if replay:
            cfg = ceiling_config(entry["thresholds"])
            real = {r: detector_first_critical(steps, cfg) for r, steps in trace.items()}
            entry["as_config_replayed"] = scored(scorer, labelled, real)
            entry["as_config_mismatch"] = sorted(r for r in runs if real[r] != one[r])
        out["sets"][key] = entry
    out["defaults"] = rows
    out["baselines"] = {}
    for name in scorer.BASELINES:
        alerts = scorer.run_baseline(name, labelled)
        s = scorer.score(labelled, alerts)
        costly = next(((a["step"], a["signature"]) for a in alerts
                       if a["run_id"] == COSTLY_RUN and a["severity"] == CRITICAL), None)
        out["baselines"][name] = {"by5": s["caught_by5"], "false_alarm": s["false_alarm_rate"],
                                  "pages_" + COSTLY_RUN.replace("-", "_"): costly}
    return out


def ceiling_config(thresholds: dict[str, dict[str, Any]], base: DetectorConfig | None = None) -> DetectorConfig:
    """The `DetectorConfig` whose main thresholds sit just above the healthy maxima (a shared field, such as
    growth_min_factor, would take the larger); a test no healthy run is judged by fires on anything."""
    changes: dict[str, Any] = {}
    for name, th in thresholds.items():
        # a test no healthy run is ever judged by may fire on anything (a factor <= 0 is no limit)
        value = just_above(th["ceiling"]) if th["ceiling"] is not None else 0.0 if BY_NAME[name].log_field else NEG
        changes[th["field"]] = max(changes.get(th["field"], NEG), value)
    return dataclasses.replace(base or DetectorConfig(), **changes)


def just_above(x: float) -> float:
    return x + max(abs(x), 1e-300) * 1e-9


# --------------------------------------------------------------------------------------------- output

def _fmt(v: float | None, spec: str = "6.3f") -> str:
    return format(v, spec) if v is not None else f"{'-':>6}"


def print_report(out: dict[str, Any]) -> None:
    print(f"traces: {out['traces']}  ({out['runs']} runs: {out['diverged']} diverged, {out['healthy']} healthy)\n")
    allh = out["sets"]["all healthy"]["thresholds"]
    wo = out["sets"][f"without {COSTLY_RUN}"]["thresholds"]
    print(f"{'test':<20} {'threshold (field)':<20} {'default':>7} {'FA 0 at':>8} {'set by':<27} {'alone':>5}"
          f"   {'w/o 039':>8} {'set by':<27} {'alone':>5}")
    for test in TESTS:
        a, b = allh[test.name], wo[test.name]
        print(f"{test.name:<20} {test.field:<20} {a['default']:>7.3g} {_cell(a['ceiling'])} {_setter(a):<27} "
              f"{_fmt(a['by5_alone'], '5.3f')}   {_cell(b['ceiling'])} {_setter(b):<27} "
              f"{_fmt(b['by5_alone'], '5.3f')}")
    print("  FA 0 at: just above the largest value on a healthy run (the test's other settings at their defaults)\n"
          "  alone: by+5 of that test by itself at that threshold, with the non-finite test\n"
          f"  w/o 039: the same with {COSTLY_RUN} left out of the healthy runs\n")
    print(f"{'detector':<58} {'by+5':>6} {'delay':>6} {'FA':>6}  healthy runs paged")
    for name, row in out["defaults"].items():
        print(f"{name:<58} {_row(row)}")
    for key, entry in out["sets"].items():
        label = "silent on every healthy run" if key == "all healthy" else f"silent on every healthy run {key}"
        print(f"ceiling, {label}:")
        print(f"{'  one threshold per test, just above its healthy max':<58} {_row(entry['one_threshold_each'])}")
        if "as_config_replayed" in entry:
            print(f"{'  the same as a DetectorConfig, replayed by the detector':<58} "
                  f"{_row(entry['as_config_replayed'])}")
        print(f"{'  any thresholds of each test (Pareto bound)':<58} {_row(entry['any_thresholds'])}")
    if out["defaults_mismatch"]:
        print(f"\nWARNING: rebuilt defaults differ from the detector on {', '.join(out['defaults_mismatch'])}")
    for key, entry in out["sets"].items():
        if entry.get("as_config_mismatch"):
            print(f"WARNING ({key}): the replayed config differs from the statistics on "
                  f"{', '.join(entry['as_config_mismatch'])}")
    ceiling = out["sets"]["all healthy"]["one_threshold_each"]
    print(f"\n{'baseline':<20} {'by+5':>6} {'FA':>6}  {'pages ' + COSTLY_RUN:<34} the FA 0 ceiling dominates it")
    for name, b in out["baselines"].items():
        page = b["pages_" + COSTLY_RUN.replace("-", "_")]
        beats = ceiling["by5"] > b["by5"] and ceiling["false_alarm"] <= b["false_alarm"]
        print(f"{name:<20} {_row(b)}  {f'step {page[0]} ({page[1]})' if page else 'no':<34} "
              f"{'yes' if beats else 'no'}")


def _cell(v: float | None) -> str:
    return f"{v:>8.4g}" if v is not None else f"{'any':>8}"


def _setter(th: dict[str, Any]) -> str:
    return f"{th['set_by']} @{th['at_step']}" if th["set_by"] else "(no healthy value)"


def _row(r: dict[str, Any]) -> str:
    if "delay_med" not in r:
        return f"{_fmt(r['by5'])} {_fmt(r['false_alarm'])}"
    paged = ", ".join(r["healthy_paged"]) or "none"
    return f"{_fmt(r['by5'])} {_fmt(r['delay_med'], '6.1f')} {_fmt(r['false_alarm'])}  {paged}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--traces", default=str(REPO.parent / "shared" / "traces" / "dev"))
    parser.add_argument("--scorer", default=str(REPO.parent / "shared" / "tools" / "score.py"))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--no-replay", action="store_true",
                        help="skip the detector's own replays (the defaults check and the ceiling config's)")
    args = parser.parse_args()
    out = measure(args.traces, args.scorer, replay=not args.no_replay)
    if args.json:
        print(json.dumps(out, indent=1, allow_nan=False))
    else:
        print_report(out)
    ok = not out["defaults_mismatch"] and not any(e.get("as_config_mismatch") for e in out["sets"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
