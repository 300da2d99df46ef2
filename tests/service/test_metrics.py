"""GET /metrics on a real server: run state from the database, requests by route template, names that
`promtool check metrics` accepts, and a 2-worker server whose scrapes add up every worker's counts."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import REGISTRY
from sqlalchemy import Engine, text

from gradwatch_service.alerting.metrics import count_database_errors

from ..support.databases import new_database_url, new_run_id
from ..support.prometheus import require_binary
from ..support.serverproc import ServerProcess

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: httpx.Client) -> Samples:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def until(check: object, timeout: float = 5.0) -> None:
    """Run state is cached for about a second: poll until `check()` holds."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_a_run_with_nan_shows_its_state_and_finishing_it_marks_it_not_running(http: httpx.Client) -> None:
    run_id = new_run_id("metrics")
    assert http.put(f"/v1/runs/{run_id}", json={"project": "vision", "layers": ["a", "b"]}).status_code == 201
    steps = [{"step": i, "loss": 2.0, "grad_norm": 1.0, "layer_grad_norms": [0.5, 0.5]} for i in range(20)]
    steps.append({"step": 20, "loss": "NaN", "grad_norm": "Infinity", "layer_grad_norms": [0.5, "NaN"]})
    assert http.post(f"/v1/runs/{run_id}/steps", json={"steps": steps}).status_code == 200
    labels = {"project": "vision", "run": run_id}

    until(lambda: value(scrape(http), "gradwatch_run_last_step", **labels) == 20)
    samples = scrape(http)
    assert math.isnan(value(samples, "gradwatch_run_loss", **labels))  # type: ignore[arg-type]
    assert value(samples, "gradwatch_run_grad_norm", **labels) == math.inf
    assert value(samples, "gradwatch_run_running", **labels) == 1
    assert value(samples, "gradwatch_run_open_incidents", **labels, signature="nonfinite", severity="critical") == 1
    assert abs(value(samples, "gradwatch_run_last_step_timestamp_seconds", **labels) - time.time()) < 60  # type: ignore[operator]
    assert value(samples, "gradwatch_run_state_up") == 1
    label_names = {name for _, labelset in samples for name, _ in labelset}
    assert not label_names & {"step", "layer"}  # cardinality: a series per run, never per step or layer

    assert http.put(f"/v1/runs/{run_id}", json={"status": "finished"}).status_code == 200
    until(lambda: value(scrape(http), "gradwatch_run_running", **labels) == 0)


def test_requests_are_counted_by_route_template_and_status(http: httpx.Client) -> None:
    run_id = new_run_id("metrics")
    before = scrape(http)
    assert http.get(f"/v1/runs/{run_id}").status_code == 404
    assert http.get("/no/such/route").status_code == 404
    after = scrape(http)

    def delta(**labels: str) -> float:
        return (value(after, "gradwatch_http_requests_total", **labels) or 0) - \
               (value(before, "gradwatch_http_requests_total", **labels) or 0)

    assert delta(method="GET", route="/v1/runs/{run_id}", status="404") == 1
    assert delta(method="GET", route="unmatched", status="404") == 1
    assert not any(run_id in v for _, labelset in after for _, v in labelset)
    assert value(after, "gradwatch_http_request_duration_seconds_count", method="GET", route="/v1/runs/{run_id}")


def test_promtool_finds_nothing_to_criticise_in_a_real_scrape(http: httpx.Client, tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    run_id = new_run_id("lint")
    http.put(f"/v1/runs/{run_id}", json={"layers": ["a"]})
    http.post(f"/v1/runs/{run_id}/steps", json={"steps": [{"step": 0, "loss": "NaN", "layer_grad_norms": [1.0]}]})
    body = http.get("/metrics").text
    assert "gradwatch_run_loss{" in body and "gradwatch_http_requests_total{" in body
    check = subprocess.run([promtool, "check", "metrics"], input=body.encode(), capture_output=True, timeout=30)
    assert (check.returncode, check.stdout + check.stderr) == (0, b"")


def test_database_errors_are_counted_by_class(engine: Engine) -> None:
    count_database_errors(engine)
    kind = "OperationalError" if engine.dialect.name == "sqlite" else "UndefinedTable"
    before = REGISTRY.get_sample_value("gradwatch_database_errors_total", {"kind": kind}) or 0
    with pytest.raises(Exception), engine.connect() as conn:  # noqa: B017 - any DBAPI error will do
        conn.execute(text("SELECT * FROM no_such_table"))
    assert REGISTRY.get_sample_value("gradwatch_database_errors_total", {"kind": kind}) == before + 1


def test_a_committed_batch_is_counted_by_steps_values_detector_time_and_incidents(http: httpx.Client) -> None:
    run_id = new_run_id("counted")
    assert http.put(f"/v1/runs/{run_id}", json={"layers": ["a", "b"]}).status_code == 201
    counted = ("gradwatch_ingested_steps_total", "gradwatch_ingested_values_total",
               "gradwatch_ingest_batch_steps_count", "gradwatch_detector_duration_seconds_count")
    opened = {"signature": "nonfinite", "severity": "critical"}
    before = scrape(http)
    steps = [{"step": 0, "loss": 2.0, "grad_norm": 1.0, "layer_grad_norms": [0.5, 0.25]},
             {"step": 1, "loss": 2.0, "layer_grad_norms": [0.5, None]},  # None is "not measured"
             {"step": 2, "loss": "NaN", "grad_norm": 1.0}]  # NaN is a measured value
    assert http.post(f"/v1/runs/{run_id}/steps", json={"steps": steps}).status_code == 200
    assert http.post(f"/v1/runs/{run_id}/steps", json={"steps": steps}).json()["duplicates"] == 3  # not counted
    after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)

    assert [delta(name) for name in counted] == [3, 8, 1, 1]  # 5 scalars + 3 layer norms; one batch judged
    assert delta("gradwatch_incidents_opened_total", **opened) == 1


def test_the_webhook_outbox_and_delivery_log_are_exported(http: httpx.Client) -> None:
    """Read from the database like run state (the outbox and the delivery log hold them); other tests on the
    session server subscribe receivers, so only the shape and the sign are known here."""
    samples = scrape(http)
    depth = value(samples, "gradwatch_webhook_outbox_depth")
    assert depth is not None and depth >= 0
    outcomes = {dict(labels)["outcome"]: v for (name, labels), v in samples.items()
                if name == "gradwatch_webhook_deliveries_total"}
    assert set(outcomes) == {"delivered", "failed", "dead"} and min(outcomes.values()) >= 0


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    url, _ = new_database_url("sqlite", tmp_path)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left by an earlier server")  # would count twice, or break
    proc = ServerProcess(url, args=["--workers", "2"], env={"GRADWATCH_METRICS_DIR": str(metrics_dir)},
                         log_path=tmp_path / "server.log")
    proc.start()
    yield proc, metrics_dir
    proc.stop()


@pytest.mark.slow
def test_two_workers_scrape_the_sum_of_both(two_workers: tuple[ServerProcess, Path]) -> None:
    server, metrics_dir = two_workers
    assert not (metrics_dir / "counter_1.db").exists()
    # each worker writes its own files into the multiprocess directory
    until(lambda: len({p.stem.rsplit("_", 1)[1] for p in metrics_dir.glob("counter_*.db")}) == 2, timeout=20)
    for _ in range(30):  # a new connection each: the kernel spreads them over both workers
        assert httpx.get(server.url + "/v1/runs", timeout=30).status_code == 200
    for _ in range(6):  # whichever worker answers, the scrape adds up both
        with httpx.Client(base_url=server.url, timeout=30) as http:
            samples = scrape(http)
        assert value(samples, "gradwatch_http_requests_total", method="GET", route="/v1/runs", status="200") == 30
        assert value(samples, "gradwatch_run_state_up") == 1


def test_with_metrics_off_there_is_no_metrics_route_and_ingest_still_works(database_url: str,
                                                                            tmp_path: Path) -> None:
    server = ServerProcess(database_url, env={"GRADWATCH_METRICS": "false"}, log_path=tmp_path / "server.log")
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/metrics").status_code == 404
            run_id = new_run_id("nometrics")
            assert http.put(f"/v1/runs/{run_id}", json={"layers": ["a"]}).status_code == 201
            steps = [{"step": 0, "loss": 2.0, "grad_norm": 1.0, "layer_grad_norms": [0.5]},
                     {"step": 1, "loss": "NaN", "grad_norm": 1.0, "layer_grad_norms": [0.5]}]
            r = http.post(f"/v1/runs/{run_id}/steps", json={"steps": steps})
            assert r.status_code == 200 and r.json()["accepted"] == 2
            assert [i["signature"] for i in r.json()["open_incidents"]] == ["nonfinite"]
            assert len(http.get(f"/v1/runs/{run_id}/steps").json()["steps"]) == 2
            assert http.get("/metrics").status_code == 404
    finally:
        server.stop()
