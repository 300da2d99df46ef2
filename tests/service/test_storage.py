"""Storage: the repository functions against a real SQLite file and a real PostgreSQL."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import Engine, select, text

from gradwatch.detect import DetectorConfig
from gradwatch_service.errors import InvalidInput, RunNotFound, StepConflict
from gradwatch_service.ingest import append_steps, upsert_run
from gradwatch_service.queries import get_run, get_run_row, read_series, read_steps
from gradwatch_service.schemas import RunUpsert, StepBatch
from gradwatch_service.storage.db import read_connection, write_transaction
from gradwatch_service.storage.models import steps

from ..support.databases import new_run_id

NONFINITE = [math.nan, math.inf, -math.inf]


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or a == b


def _create(engine: Engine, layers: list[str] | None = None, **fields: object) -> str:
    run_id = new_run_id()
    with write_transaction(engine) as conn:
        assert upsert_run(conn, run_id, RunUpsert(layers=layers, **fields)) is True  # type: ignore[arg-type]
    return run_id


def _append(engine: Engine, run_id: str, batch: dict) -> tuple[int, int]:
    with write_transaction(engine) as conn:
        out = append_steps(conn, run_id, StepBatch.model_validate(batch))
    return out.accepted, out.duplicates


def test_nonfinite_values_round_trip_in_scalars_and_layers(engine: Engine) -> None:
    run_id = _create(engine, layers=["a", "b", "c"])
    sent = {"step": 0, "loss": math.nan, "grad_norm": math.inf, "lr": -math.inf, "update_norm": 0.5,
            "layer_grad_norms": [math.nan, math.inf, -math.inf], "layer_weight_norms": [1.0, None, math.nan],
            "scalars": {"acc": math.nan, "top5": -math.inf}}
    assert _append(engine, run_id, {"steps": [sent]}) == (1, 0)
    with read_connection(engine) as conn:
        row = get_run_row(conn, run_id)
        (got,) = read_steps(conn, row.id, start=None, end=None, limit=10)
        # None is "not measured", not NaN: on SQLite a NaN bound as a parameter would have come back as NULL
        stored_nulls = conn.execute(select(steps.c.loss).where(steps.c.run_pk == row.id)).scalar()
    assert stored_nulls is not None
    for name in ("loss", "grad_norm", "lr", "update_norm"):
        assert _same(getattr(got, name), sent[name]), name
    for name in ("layer_grad_norms", "layer_weight_norms"):
        assert all(_same(a, b) for a, b in zip(getattr(got, name), sent[name], strict=True)), name
    assert got.layer_update_norms is None
    assert math.isnan(got.scalars["acc"]) and got.scalars["top5"] == -math.inf  # type: ignore[index]


def test_resend_is_a_duplicate_and_changes_nothing(engine: Engine) -> None:
    run_id = _create(engine, layers=["a"])
    batch = {"steps": [{"step": i, "loss": [1.0, math.nan][i % 2], "layer_grad_norms": [float(i)]} for i in range(5)]}
    assert _append(engine, run_id, batch) == (5, 0)
    assert _append(engine, run_id, batch) == (0, 5)
    more = {"steps": batch["steps"][3:] + [{"step": 5, "loss": 2.0}]}
    assert _append(engine, run_id, more) == (1, 2)
    with read_connection(engine) as conn:
        run = get_run(conn, run_id)
    assert run is not None and run.n_steps == 6 and run.last_step == 5


def test_changed_resend_is_a_conflict_and_stores_nothing_of_the_batch(engine: Engine) -> None:
    run_id = _create(engine)
    _append(engine, run_id, {"steps": [{"step": 0, "loss": 1.0}, {"step": 1, "loss": math.nan}]})
    with pytest.raises(StepConflict) as info:
        _append(engine, run_id, {"steps": [{"step": 2, "loss": 3.0}, {"step": 1, "loss": 1.0}]})
    assert info.value.steps == [1]
    with read_connection(engine) as conn:
        run = get_run(conn, run_id)
    assert run is not None and run.n_steps == 2 and run.last_step == 1  # step 2 was not stored


def test_conflict_inside_one_batch(engine: Engine) -> None:
    run_id = _create(engine)
    with pytest.raises(StepConflict):
        _append(engine, run_id, {"steps": [{"step": 7, "loss": 1.0}, {"step": 7, "loss": 2.0}]})
    assert _append(engine, run_id, {"steps": [{"step": 7, "loss": 1.0}, {"step": 7, "loss": 1.0}]}) == (1, 1)


def test_out_of_order_steps_are_stored_and_older_ones_flagged_late(engine: Engine) -> None:
    run_id = _create(engine)
    assert _append(engine, run_id, {"steps": [{"step": 5, "loss": 1.0}, {"step": 2, "loss": 1.0}]}) == (2, 0)
    assert _append(engine, run_id, {"steps": [{"step": 3, "loss": 1.0}, {"step": 9, "loss": 1.0}]}) == (2, 0)
    with read_connection(engine) as conn:
        row = get_run_row(conn, run_id)
        got = read_steps(conn, row.id, start=None, end=None, limit=10)
    assert [(s.step, s.late) for s in got] == [(2, False), (3, True), (5, False), (9, False)]
    assert row.last_step == 9


def test_batch_layers_in_another_order_map_onto_the_run(engine: Engine) -> None:
    run_id = _create(engine, layers=["a", "b"])
    _append(engine, run_id, {"layers": ["b", "c"], "steps": [{"step": 0, "layer_grad_norms": [2.0, 3.0]}]})
    _append(engine, run_id, {"steps": [{"step": 1, "layer_grad_norms": [1.0, 2.0, 3.0]}]})
    with read_connection(engine) as conn:
        row = get_run_row(conn, run_id)
        got = read_steps(conn, row.id, start=None, end=None, limit=10)
        series = read_series(conn, row.id, list(row.layer_names), fields=["layer_grad_norms"], layers=["c"],
                             start=None, end=None, max_points=None)
    assert list(row.layer_names) == ["a", "b", "c"]
    assert got[0].layer_grad_norms == [None, 2.0, 3.0]
    assert series[0].values == [3.0, 3.0]
    # the same step resent in the batch's own order is still a duplicate
    assert _append(engine, run_id, {"layers": ["c", "b"], "steps": [{"step": 0, "layer_grad_norms": [3.0, 2.0]}]}) \
        == (0, 1)


def test_inconsistent_batches_are_rejected(engine: Engine) -> None:
    run_id = _create(engine, layers=["a", "b"])
    with pytest.raises(InvalidInput, match="has 1 values but there are 2 layers"):
        _append(engine, run_id, {"layers": ["a", "b"], "steps": [{"step": 0, "layer_grad_norms": [1.0]}]})
    with pytest.raises(InvalidInput, match="run has 2 layers"):
        _append(engine, run_id, {"steps": [{"step": 0, "layer_grad_norms": [1.0, 2.0, 3.0]}]})
    with pytest.raises(InvalidInput, match="unique"):
        _append(engine, run_id, {"layers": ["a", "a"], "steps": []})
    with pytest.raises(RunNotFound):
        _append(engine, "no-such-run", {"steps": [{"step": 0}]})


def test_put_is_idempotent_and_layers_only_grow(engine: Engine) -> None:
    run_id = _create(engine, layers=["a"], project="p1", config={"lr": 0.1, "bad": math.nan})
    with write_transaction(engine) as conn:
        assert upsert_run(conn, run_id, RunUpsert(layers=["a", "b"], status="finished")) is False
        assert upsert_run(conn, run_id, RunUpsert(layers=["a"])) is False
        with pytest.raises(InvalidInput):
            upsert_run(conn, run_id, RunUpsert(layers=["b", "a"]))
    with read_connection(engine) as conn:
        run = get_run(conn, run_id)
    assert run is not None
    assert (run.project, run.status, run.layers) == ("p1", "finished", ["a", "b"])
    assert run.config == {"lr": 0.1, "bad": "NaN"}


def test_rows_are_compact_and_keyed_by_run(engine: Engine) -> None:
    run_id = _create(engine, layers=[f"l{i}" for i in range(46)])
    _append(engine, run_id, {"steps": [{"step": 0, "loss": 1.0, "layer_grad_norms": [1.0] * 46}]})
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            size = conn.execute(text("SELECT length(layer_grad_norms) FROM steps")).scalar()
            assert size == 46 * 8
        else:
            dims = conn.execute(text("SELECT array_length(layer_grad_norms, 1) FROM steps")).scalar()
            assert dims == 46


def test_dashboards_can_query_one_layer_with_plain_sql_on_postgres(engine: Engine) -> None:
    """What a Grafana panel runs: one layer's series by name, straight from the schema (PostgreSQL arrays)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite stores per-layer values as blobs; dashboards read them through the API")
    run_id = _create(engine, layers=["embed.weight", "head.weight"])
    _append(engine, run_id, {"steps": [{"step": i, "layer_grad_norms": [float(i), [1.0, math.nan][i % 2]]}
                                       for i in range(4)]})
    sql = text("""
        SELECT s.step, s.layer_grad_norms[l.ord] AS value
        FROM steps s
        JOIN runs r ON r.id = s.run_pk
        CROSS JOIN LATERAL jsonb_array_elements_text(r.layer_names) WITH ORDINALITY AS l(name, ord)
        WHERE r.run_id = :run AND l.name = :layer
        ORDER BY s.step""")
    with engine.connect() as conn:
        rows = conn.execute(sql, {"run": run_id, "layer": "head.weight"}).all()
    assert [r.step for r in rows] == [0, 1, 2, 3]
    assert rows[0].value == 1.0 and math.isnan(rows[1].value)


@pytest.mark.parametrize("steps", [
    [{"step": 0, "layer_grad_norms": [1.0]}, {"step": 0, "layer_grad_norms": [1.0]}],  # repeated in the batch
    [{"step": 0, "layer_grad_norms": [1.0, 2.0, 3.0]}],  # resends a stored step
])
def test_a_wrong_array_length_is_invalid_before_any_step_is_compared(engine: Engine, steps: list[dict]) -> None:
    """Layers in another order than the run's mean an index map; a wrong length must be a InvalidInput (422) before
    that map is applied to compare a repeated or stored step, not a ValueError (500) from inside the comparison."""
    run_id = _create(engine, layers=["a", "b"])
    assert _append(engine, run_id, {"steps": [{"step": 0, "layer_grad_norms": [1.0, 2.0]}]}) == (1, 0)
    with pytest.raises(InvalidInput, match="has [13] values but there are 2 layers"):
        _append(engine, run_id, {"layers": ["b", "a"], "steps": steps})


def test_a_batch_with_no_layers_and_empty_arrays_is_judged_without_error(engine: Engine) -> None:
    """Empty per-layer arrays for an empty layer list mean "no per-layer values", for the detectors too."""
    run_id = _create(engine)
    batch = StepBatch.model_validate({"layers": [], "steps": [{"step": 0, "loss": 1.0, "layer_grad_norms": []}]})
    with write_transaction(engine) as conn:
        out = append_steps(conn, run_id, batch, DetectorConfig())
    assert (out.accepted, out.raised_incidents) == (1, [])
    with read_connection(engine) as conn:
        (got,) = read_steps(conn, get_run_row(conn, run_id).id, start=None, end=None, limit=10)
    assert got.layer_grad_norms == [] and got.loss == 1.0
