"""Step rollups: maintained in the ingest transaction, equal to a recomputation from the stored steps, built by
the migration for existing steps, and what long downsampled series are read from. Both databases."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any

from sqlalchemy import Engine, delete, select

from gradwatch.wire import LAYER_FIELDS, SCALAR_FIELDS, encode_binary_batch, jsonable
from gradwatch_service.binary_batch import parse_binary_batch
from gradwatch_service.ingest import append_steps, upsert_run
from gradwatch_service.limits import InputLimits
from gradwatch_service.queries import get_run_row, plan_downsample, read_series, read_steps
from gradwatch_service.schemas import RunUpsert, StepBatch
from gradwatch_service.settings import Settings
from gradwatch_service.storage import migrate
from gradwatch_service.storage.db import read_connection, write_transaction
from gradwatch_service.storage.dialect import storage_dialect
from gradwatch_service.storage.models import ROLLUP_SCALAR_STATS, ROLLUP_WIDTHS, step_rollups, steps
from gradwatch_service.storage.rollup_worker import RollupWorker
from gradwatch_service.storage.rollups import catch_up_rollups, rolled_up_through
from gradwatch_service.storage.steps_table import StepColumns, insert_rows

from ..support.databases import new_run_id

Stats = dict[str, Any]


# ------------------------------------------------------------------- the oracle: plain Python, step by step

def _kind(v: float) -> str:
    return "nan" if v != v else ("posinf" if v > 0 else "neginf")


def _expected_stats(points: list[tuple[int, float | None]]) -> Stats:
    """What a downsampled group keeps of one series' (step, value) points, ascending; None = not measured."""
    out: Stats = {"min": None, "max": None, "min_step": None, "max_step": None, "last": None, "last_step": None,
                  "nonfinite": 0, "nan_step": None, "posinf_step": None, "neginf_step": None}
    for step, v in points:
        if v is None:
            continue
        out["last"], out["last_step"] = v, step
        if math.isfinite(v):
            if out["min"] is None or v < out["min"]:
                out["min"], out["min_step"] = v, step
            if out["max"] is None or v > out["max"]:
                out["max"], out["max_step"] = v, step
        else:
            out["nonfinite"] += 1
            if out[f"{_kind(v)}_step"] is None:
                out[f"{_kind(v)}_step"] = step
    return out


def _expected_rollups(engine: Engine, run_id: str) -> dict[tuple[int, int], Stats]:
    """Every level's buckets, recomputed from the stored steps as the API returns them."""
    with read_connection(engine) as conn:
        run = get_run_row(conn, run_id)
        stored = read_steps(conn, run.id, start=None, end=None, limit=10**9)
        n_layers = len(run.layer_names)
    out: dict[tuple[int, int], Stats] = {}
    for width in ROLLUP_WIDTHS:
        buckets: dict[int, list[Any]] = defaultdict(list)
        for s in stored:
            buckets[s.step // width].append(s)
        for b, members in buckets.items():
            row: Stats = {"n": len(members), "first_step": members[0].step, "last_step": members[-1].step,
                          "time_min": min(s.time for s in members), "time_max": max(s.time for s in members)}
            for f in SCALAR_FIELDS:
                for stat, v in _expected_stats([(s.step, getattr(s, f)) for s in members]).items():
                    row[f"{f}_{stat}"] = v
            for f in LAYER_FIELDS:
                per_layer = []
                for j in range(n_layers):
                    points = [(s.step, (getattr(s, f) or [])[j] if j < len(getattr(s, f) or []) else None)
                              for s in members]
                    per_layer.append(_expected_stats(points))
                measured = any(st["last_step"] is not None for st in per_layer)
                for stat in ROLLUP_SCALAR_STATS:
                    row[f"{f}_{stat}"] = [st[stat] for st in per_layer] if measured else None
            out[(width, b)] = row
    return out


def _stored_rollups(engine: Engine, run_id: str) -> dict[tuple[int, int], Stats]:
    with read_connection(engine) as conn:
        run = get_run_row(conn, run_id)
        rows = conn.execute(select(step_rollups).where(step_rollups.c.run_pk == run.id)).mappings().all()
        n_layers = len(run.layer_names)
    out = {}
    for r in rows:
        row = {k: v for k, v in r.items() if k not in ("run_pk", "width", "bucket")}
        for f in LAYER_FIELDS:
            for stat in ROLLUP_SCALAR_STATS:
                a = row[f"{f}_{stat}"]
                if a is not None:  # older buckets may have fewer layers; counts come back as floats
                    a = [None if v is None else (int(v) if stat.endswith(("step", "nonfinite")) else v) for v in a]
                    row[f"{f}_{stat}"] = a + [0 if stat == "nonfinite" else None] * (n_layers - len(a))
        out[(r["width"], r["bucket"])] = row
    return out


def _canon(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return "NaN"
    if isinstance(x, list):
        return [_canon(v) for v in x]
    return x


def _assert_rollups_match(engine: Engine, run_id: str) -> None:
    expected, stored = _expected_rollups(engine, run_id), _stored_rollups(engine, run_id)
    assert sorted(stored) == sorted(expected)
    for key, row in expected.items():
        for column, value in row.items():
            got = stored[key][column]
            assert _canon(got) == _canon(value), (key, column, got, value)


# ----------------------------------------------------------------------------------------------- writing

def _create(engine: Engine, layers: list[str]) -> str:
    run_id = new_run_id()
    with write_transaction(engine) as conn:
        upsert_run(conn, run_id, RunUpsert(layers=layers))
    return run_id


def _send(engine: Engine, run_id: str, batch: dict[str, Any], binary: bool) -> tuple[int, int]:
    body: StepBatch | StepColumns = StepBatch.model_validate(jsonable(batch))
    if binary:
        body = parse_binary_batch(encode_binary_batch(jsonable(batch)),
                                  InputLimits.from_settings(Settings(max_batch_steps=100_000)))
    with write_transaction(engine) as conn:
        out = append_steps(conn, run_id, body)
    return out.accepted, out.duplicates


def _random_value(rng: random.Random) -> float | None:
    r = rng.random()
    if r < 0.04:
        return rng.choice([math.nan, math.inf, -math.inf])
    if r < 0.1:
        return None
    return rng.choice([rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0), 10.0 ** rng.randint(-3, 6)])


def _random_step(rng: random.Random, step: int, layers: list[str]) -> dict[str, Any]:
    s: dict[str, Any] = {"step": step, "time": 1.7e9 + step + rng.random()}
    for f in SCALAR_FIELDS:
        if (v := _random_value(rng)) is not None:
            s[f] = v
    for f in LAYER_FIELDS:
        if rng.random() < 0.8:
            s[f] = [_random_value(rng) for _ in layers]
    return s


def test_rollups_equal_a_recomputation_after_random_batches(engine: Engine) -> None:
    """In-order batches, identical resends, late steps far behind, NaN/±Inf, unmeasured values, a layer added
    mid-run, both wires: after each kind the stored buckets of every level equal a recomputation."""
    rng = random.Random(12)
    layers = ["embed", "blocks.0", "head"]
    run_id = _create(engine, layers)
    sent: dict[int, dict[str, Any]] = {}
    next_step, held_back = 0, []
    for k in range(14):
        if k == 6:  # a layer appears: later steps carry four values, older buckets keep three
            layers = [*layers, "blocks.1"]
        size = rng.choice([1, 7, 64, 300, 900])
        batch_steps = []
        for _ in range(size):
            step = _random_step(rng, next_step, layers)
            next_step += rng.choice([1, 1, 1, 3])
            (held_back if rng.random() < 0.05 else batch_steps).append(step)
        for s in batch_steps:
            sent[s["step"]] = s
        binary = k % 2 == 0
        assert _send(engine, run_id, {"layers": layers, "steps": batch_steps}, binary)[1] == 0
        if k % 4 == 3:  # the late steps the client held back, older than what is stored
            for s in held_back:
                sent[s["step"]] = s
            late = [{**s, **{f: (s[f] + [None] * (len(layers) - len(s[f]))) for f in LAYER_FIELDS if f in s}}
                    for s in held_back]
            assert _send(engine, run_id, {"layers": layers, "steps": late}, not binary)[0] == len(late)
            held_back = []
            _assert_rollups_match(engine, run_id)
    _assert_rollups_match(engine, run_id)

    before = _stored_rollups(engine, run_id)
    resend = [sent[t] for t in sorted(sent)[-500:]]
    resend = [{**s, **{f: (s[f] + [None] * (len(layers) - len(s[f]))) for f in LAYER_FIELDS if f in s}}
              for s in resend]
    assert _send(engine, run_id, {"layers": layers, "steps": resend}, binary=True) == (0, len(resend))
    assert _send(engine, run_id, {"layers": layers, "steps": resend}, binary=False) == (0, len(resend))
    assert _canon_all(_stored_rollups(engine, run_id)) == _canon_all(before)  # a resend stores, and changes, nothing


def test_healthy_batches_with_ties_and_gaps_take_the_quick_way_and_equal_a_recomputation(engine: Engine) -> None:
    """Every value measured and finite (buckets straight from the values, buckets.bucket_units' quick way):
    values from a few levels, so a bucket's minimum and maximum recur and their step is the first one; steps
    with gaps, and batches that start and end inside buckets."""
    rng = random.Random(7)
    layers = ["embed", "blocks.0", "head"]
    run_id = _create(engine, layers)
    step = 5
    for k, size in enumerate([1, 63, 64, 200, 7, 500, 130]):
        steps = []
        for _ in range(size):
            s = {"step": step, "time": 1.7e9 + step}
            for f in SCALAR_FIELDS:
                s[f] = rng.choice([0.5, 1.0, 2.0, -0.0, 0.0])
            for f in LAYER_FIELDS:
                s[f] = [rng.choice([0.25, 3.0, 3.0, 1e6]) for _ in layers]
            steps.append(s)
            step += rng.choice([1, 1, 1, 2, 40])
        _send(engine, run_id, {"layers": layers, "steps": steps}, binary=k % 2 == 0)
        _assert_rollups_match(engine, run_id)


def _canon_all(rows: dict[tuple[int, int], Stats]) -> dict[tuple[int, int], Stats]:
    return {k: {c: _canon(v) for c, v in row.items()} for k, row in rows.items()}


def test_a_late_step_does_not_replace_the_last_value(engine: Engine) -> None:
    run_id = _create(engine, ["a"])
    first = [{"step": 10, "loss": 1.0, "layer_grad_norms": [1.0]},
             {"step": 20, "loss": math.nan, "layer_grad_norms": [math.inf]}]
    _send(engine, run_id, {"layers": ["a"], "steps": first}, binary=True)
    _send(engine, run_id, {"layers": ["a"], "steps": [{"step": 15, "loss": 5.0, "layer_grad_norms": [5.0]}]},
          binary=False)
    row = _stored_rollups(engine, run_id)[(64, 0)]
    assert math.isnan(row["loss_last"]) and row["loss_last_step"] == 20
    assert row["layer_grad_norms_last"] == [math.inf] and row["layer_grad_norms_last_step"] == [20]
    assert (row["loss_max"], row["loss_max_step"], row["n"], row["loss_nonfinite"]) == (5.0, 15, 3, 1)
    assert row["layer_grad_norms_max"] == [5.0] and row["layer_grad_norms_posinf_step"] == [20]


def test_the_migration_builds_rollups_for_steps_already_stored(engine: Engine) -> None:
    """A database at 0004 with steps is upgraded: its rollups equal a recomputation."""
    migrate.downgrade(engine, "0004")
    rng = random.Random(4)
    layers = ["a", "b"]
    run_id = new_run_id()
    with write_transaction(engine) as conn:
        upsert_run(conn, run_id, RunUpsert(layers=layers))
        run_pk = get_run_row(conn, run_id).id
        batch = StepBatch.model_validate(jsonable({"steps": [_random_step(rng, t, layers) for t in range(5000)]}))
        arrays = {f: [getattr(s, f) for s in batch.steps] for f in LAYER_FIELDS}
        columns = StepColumns.from_steps(batch.steps, arrays, layers)
        insert_rows(conn, columns.rows(run_pk, storage_dialect(conn)))
    migrate.upgrade(engine)
    _assert_rollups_match(engine, run_id)


# ------------------------------------------------------------------------------------------------ reading

def _long_run(engine: Engine, n: int, spikes: dict[int, dict[str, Any]]) -> str:
    rng = random.Random(7)
    layers = ["a", "b", "c"]
    run_id = _create(engine, layers)
    for lo in range(0, n, 10_000):
        batch = []
        for t in range(lo, min(n, lo + 10_000)):
            s = {"step": t, "loss": rng.uniform(1.0, 2.0), "grad_norm": rng.uniform(0.5, 1.0),
                 "layer_grad_norms": [rng.uniform(0.1, 0.2) for _ in layers]}
            s.update(spikes.get(t, {}))
            batch.append(s)
        _send(engine, run_id, {"layers": layers, "steps": batch}, binary=True)
    return run_id


def test_a_long_runs_series_comes_from_rollups_and_shows_the_spike_and_the_nan(engine: Engine) -> None:
    spikes = {31_337: {"grad_norm": 1e6}, 52_000: {"loss": math.nan},
              77_777: {"layer_grad_norms": [0.15, math.inf, -math.inf]}}
    run_id = _long_run(engine, 100_000, spikes)
    with read_connection(engine) as conn:
        run_pk = get_run_row(conn, run_id).id
        plan = plan_downsample(conn, run_pk, None, None, 400)
    assert plan is not None and plan.width == 256  # 100,000 // 256 = 390 ≥ 200 buckets; 1024 would give 97
    with write_transaction(engine) as conn:  # the raw steps are gone: what is read can only come from rollups
        conn.execute(delete(steps).where(steps.c.run_pk == run_pk, steps.c.step.between(1000, 98_000)))
    with read_connection(engine) as conn:
        loss, grad, a, b, c = read_series(conn, run_pk, ["a", "b", "c"], fields=["loss", "grad_norm",
                                          "layer_grad_norms"], layers=None, start=None, end=None, max_points=400)
    points = {(s.field, s.layer): dict(zip(s.steps, s.values, strict=True)) for s in (loss, grad, a, b, c)}
    assert points[("grad_norm", None)][31_337] == 1e6
    assert math.isnan(points[("loss", None)][52_000])
    assert points[("layer_grad_norms", "b")][77_777] == math.inf
    assert points[("layer_grad_norms", "c")][77_777] == -math.inf
    assert points[("layer_grad_norms", "a")].get(77_777) in (None, 0.15)
    for s in (loss, grad, a, b, c):
        finite = [v for v in s.values if math.isfinite(v)]
        assert s.steps == sorted(set(s.steps)) and 300 <= len(finite) <= 400
        assert s.steps[0] < 500 and s.steps[-1] >= 99_500  # points in the first and the last group (500 steps)
    assert max(v for v in points[("loss", None)].values() if math.isfinite(v)) <= 2.0


def test_a_series_from_rollups_is_the_raw_downsample_of_the_same_groups(engine: Engine) -> None:
    """Every point the rollup read returns is a stored step's value, and over the whole range the minimum,
    maximum and every non-finite kind's first step agree with the raw steps."""
    spikes = {4_321: {"grad_norm": math.nan}, 4_330: {"grad_norm": math.nan}, 9_000: {"loss": -math.inf}}
    run_id = _long_run(engine, 40_000, spikes)
    with read_connection(engine) as conn:
        run_pk = get_run_row(conn, run_id).id
        raw = {s.step: s for s in read_steps(conn, run_pk, start=1_234, end=38_765, limit=10**6)}
        plan = plan_downsample(conn, run_pk, 1_234, 38_765, 200)
        series = read_series(conn, run_pk, ["a", "b", "c"], fields=["loss", "grad_norm", "layer_grad_norms"],
                             layers=["b"], start=1_234, end=38_765, max_points=200)
    assert plan is not None and plan.raw  # the range's edges fall inside buckets
    for s in series:
        def value(t: int, field: str = s.field) -> float:
            v = getattr(raw[t], field)
            return v[1] if isinstance(v, list) else v

        assert all(_canon(value(t)) == _canon(v) for t, v in zip(s.steps, s.values, strict=True))
        stats = _expected_stats([(t, value(t)) for t in sorted(raw)])
        got = dict(zip(s.steps, s.values, strict=True))
        assert got[stats["min_step"]] == stats["min"] and got[stats["max_step"]] == stats["max"]
        for kind in ("nan", "posinf", "neginf"):
            if stats[f"{kind}_step"] is not None:
                assert stats[f"{kind}_step"] in got
    assert [t for t, v in zip(series[1].steps, series[1].values, strict=True) if v != v] == [4_321]  # first of a group


def test_the_level_is_the_coarsest_with_enough_buckets_and_short_ranges_read_raw_steps(engine: Engine) -> None:
    run_id = _long_run(engine, 70_000, {})
    with read_connection(engine) as conn:
        run_pk = get_run_row(conn, run_id).id
        short = plan_downsample(conn, run_pk, 0, 999, 500)  # 1,000 steps: fewer than 250 buckets of 64
        assert short is not None and (short.width, short.spans, short.raw) == (1, [], [(0, 999)])
        assert plan_downsample(conn, run_pk, 0, 400, 1000) is None  # fewer steps than points
        for start, end, points in [(0, None, 1000), (0, None, 100), (5, 69_990, 60), (123, 20_000, 200),
                                   (None, None, 2)]:
            plan = plan_downsample(conn, run_pk, start, end, points)
            assert plan is not None
            span = plan.hi - plan.lo + 1
            assert span // plan.width >= points // 2
            coarser = [w for w in ROLLUP_WIDTHS if w > plan.width]
            assert not coarser or span // coarser[0] < points // 2
            covered = [(w * b0, w * (b1 + 1) - 1) for w, b0, b1 in plan.spans] + plan.raw
            covered.sort()
            assert covered[0][0] == plan.lo and covered[-1][1] == plan.hi
            assert all(a[1] + 1 == b[0] for a, b in zip(covered, covered[1:], strict=False))  # tiled, no overlap
            assert all(hi - lo + 1 < ROLLUP_WIDTHS[0] for lo, hi in plan.raw)


def test_a_short_range_reads_a_few_layers_element_by_element_and_agrees_with_whole_arrays(engine: Engine) -> None:
    """Below the finest level the raw steps are grouped as buckets are; a handful of layers is read one array
    element each (not whole arrays), and gives the same points, non-finite and unmeasured steps included."""
    rng = random.Random(3)
    layers = [f"l{i}" for i in range(10)]
    run_id = _create(engine, layers)
    batch = []
    for t in range(3000):
        s: dict[str, Any] = {"step": t, "loss": rng.uniform(1.0, 2.0)}
        if t % 3:  # every third step measures no layer at all
            s["layer_grad_norms"] = [rng.uniform(0.1, 0.2) for _ in layers]
        batch.append(s)
    batch[1000]["layer_grad_norms"][3] = math.nan
    batch[1001]["layer_grad_norms"][3] = math.inf
    batch[2002]["layer_grad_norms"][3] = 7.5
    batch[2500]["layer_grad_norms"][3] = None  # this layer alone not measured
    _send(engine, run_id, {"layers": layers, "steps": batch}, binary=False)
    with read_connection(engine) as conn:
        run_pk = get_run_row(conn, run_id).id
        plan = plan_downsample(conn, run_pk, None, None, 200)
        args = dict(fields=["layer_grad_norms"], start=None, end=None, max_points=200)
        (one,) = read_series(conn, run_pk, layers, layers=["l3"], **args)  # type: ignore[arg-type]
        whole = read_series(conn, run_pk, layers, layers=None, **args)  # type: ignore[arg-type]
    assert plan is not None and plan.spans == [] and plan.raw == [(0, 2999)]
    assert (one.steps, [_canon(v) for v in one.values]) == (whole[3].steps, [_canon(v) for v in whole[3].values])
    got = dict(zip(one.steps, one.values, strict=True))
    assert math.isnan(got[1000]) and got[1001] == math.inf and got[2002] == 7.5
    assert 2500 not in got and all(t % 3 for t in got)  # unmeasured steps are never shown
    assert 150 <= len(one.steps) <= 202


# ------------------------------------------------------------------------- rollups merged after the commit

def _send_deferred(engine: Engine, run_id: str, batch: dict[str, Any]) -> None:
    body = parse_binary_batch(encode_binary_batch(jsonable(batch)),
                              InputLimits.from_settings(Settings(max_batch_steps=100_000)))
    with write_transaction(engine) as conn:
        append_steps(conn, run_id, body, defer_rollups=True)


def _through(engine: Engine, run_id: str) -> int:
    with read_connection(engine) as conn:
        return rolled_up_through(conn, get_run_row(conn, run_id).id)


def test_deferred_steps_wait_above_the_rollups_and_a_series_reads_them_from_the_steps(engine: Engine) -> None:
    """Ingest that leaves the rollups to the worker: the rollups say how far they go, a long series still shows
    a spike among the steps above that (read from the steps table), and catching up makes the rollups equal a
    recomputation; a late step below how far they go is merged by ingest at once."""
    rng = random.Random(5)
    layers = ["a", "b"]
    run_id = _create(engine, layers)
    _send(engine, run_id, {"layers": layers, "steps": [_random_step(rng, t, layers) for t in range(0, 5000, 2)]},
          binary=True)
    assert _through(engine, run_id) == 4998
    later = [{"step": t, "loss": 1.0, "layer_grad_norms": [0.5, 0.5]} for t in range(5000, 20_000)]
    later[7_777]["grad_norm"] = 1e9
    _send_deferred(engine, run_id, {"layers": layers, "steps": later})
    assert _through(engine, run_id) == 4998
    with read_connection(engine) as conn:
        run_pk = get_run_row(conn, run_id).id
        plan = plan_downsample(conn, run_pk, None, None, 100)
        (grad,) = read_series(conn, run_pk, layers, fields=["grad_norm"], layers=None, start=None, end=None,
                              max_points=100)
    assert plan is not None and plan.spans and plan.raw[-1] == (4999, 19_999)
    assert dict(zip(grad.steps, grad.values, strict=True))[12_777] == 1e9

    late = _random_step(rng, 1001, layers)  # below how far the rollups go: merged now
    _send_deferred(engine, run_id, {"layers": layers, "steps": [late]})
    assert _through(engine, run_id) == 4998
    with write_transaction(engine) as conn:
        assert catch_up_rollups(conn, run_pk, len(layers)) == 15_000
    assert _through(engine, run_id) == 19_999
    _assert_rollups_match(engine, run_id)


def test_an_append_in_the_transaction_merges_the_steps_a_deferred_one_left_waiting(engine: Engine) -> None:
    layers = ["a"]
    run_id = _create(engine, layers)
    _send_deferred(engine, run_id, {"layers": layers, "steps": [{"step": t, "loss": float(t)} for t in range(300)]})
    _send(engine, run_id, {"layers": layers, "steps": [{"step": t, "loss": -1.0} for t in range(300, 400)]},
          binary=False)
    assert _through(engine, run_id) == 399
    _assert_rollups_match(engine, run_id)


def test_the_worker_merges_what_it_is_told_of_and_at_start_what_was_left_waiting(engine: Engine) -> None:
    layers = ["a", "b", "c"]
    told, left = _create(engine, layers), _create(engine, layers)
    for run_id in (told, left):
        _send_deferred(engine, run_id, {"layers": layers, "steps": [
            {"step": t, "grad_norm": 1.0 + t % 7, "layer_grad_norms": [0.1, math.nan, 0.3]} for t in range(3000)]})
    assert _through(engine, left) == -1
    worker = RollupWorker(engine, chunk=1000).start()  # finds `left`, whose steps go beyond its rollups
    with read_connection(engine) as conn:
        worker.note(get_run_row(conn, told).id)
    worker.stop()
    for run_id in (told, left):
        assert _through(engine, run_id) == 2999
        _assert_rollups_match(engine, run_id)


def _stored_deferred(engine: Engine, run_id: str, steps: list[dict[str, Any]]) -> StepColumns:
    body = parse_binary_batch(encode_binary_batch(jsonable({"layers": ["a", "b", "c"], "steps": steps})),
                              InputLimits.from_settings(Settings(max_batch_steps=100_000)))
    with write_transaction(engine) as conn:
        append_steps(conn, run_id, body, defer_rollups=True)
    return body


def test_the_worker_holds_a_bounded_number_of_values_and_merges_a_wide_hold_in_groups(engine: Engine) -> None:
    """Batches held beyond 8 × max_values turn the run into a read-back (nothing more is held for it); batches
    held within it are merged in groups of at most max_values values; either way the rollups equal a
    recomputation."""
    layers = ["a", "b", "c"]
    grouped, overflowed = _create(engine, layers), _create(engine, layers)
    worker = RollupWorker(engine, max_values=200)  # not started: nothing merges while batches are noted
    with read_connection(engine) as conn:
        pk = {run_id: get_run_row(conn, run_id).id for run_id in (grouped, overflowed)}
    for k in range(3):  # 300 values each (over max_values): merged one batch a group
        body = _stored_deferred(engine, grouped, [
            {"step": t, "loss": float(t % 5), "layer_grad_norms": [0.1 * (t % 3), 1.0, 2.0]}
            for t in range(100 * k, 100 * k + 100)])
        worker.note(pk[grouped], (body, 3))
    assert worker._held == 900
    for k in range(3):  # 900 + 3 × 300 > 8 × 200: the third batch turns the run into a read-back
        body = _stored_deferred(engine, overflowed, [
            {"step": t, "grad_norm": float(t % 11), "layer_grad_norms": [1.0, 0.5 * (t % 4), 3.0]}
            for t in range(100 * k, 100 * k + 100)])
        worker.note(pk[overflowed], (body, 3))
    held = worker._waiting[pk[grouped]]
    assert worker._waiting[pk[overflowed]] is None and worker._held == 900 and held is not None
    worker.catch_up(pk[grouped], held)  # as the worker's thread does: the batches held, merged in groups
    worker.start()  # finds `overflowed` lagging, and reads its steps back
    worker.stop()
    for run_id in (grouped, overflowed):
        assert _through(engine, run_id) == 299
        _assert_rollups_match(engine, run_id)
