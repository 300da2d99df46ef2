"""The Grafana dashboards (deploy/grafana/dashboards/), checked without Grafana: the committed JSON is what
tools/dashboards.py generates; every SQL query in them (panels, annotations, variables) runs against a real
PostgreSQL migrated by `gradwatch db upgrade` and filled through a real gradwatch server with an exploding run,
as the read-only `gradwatch_reader` role, with Grafana's macros and the template variable substituted, and
returns the columns its panel needs and at least one row, at each rollup level; every PromQL expression is
accepted by a real Prometheus scraping that server (the shipped rules loaded) and returns data for the run."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from gradwatch_service.storage.db import make_engine, read_connection
from gradwatch_service.storage.models import ROLLUP_WIDTHS
from gradwatch_service.storage.rollups import lagging_runs

from .support.databases import PostgresSchema, new_run_id, require_postgres
from .support.prometheus import REPO, get_json, prometheus_server
from .support.serverproc import ServerProcess

DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
POSTGRES_UID, PROMETHEUS_UID = "gradwatch-postgres", "prometheus"
LAYERS = ["embed", "block1", "block2", "head"]
N_STEPS = 9000  # one (partial) 16384-step bucket, three of 4096 steps, ..., 141 of 64 steps
EXPLODES_AT, NAN_AT = 8200, 8700  # block2 blows up first; loss and grad norm are NaN from NAN_AT on
SPIKE_AT = 3000  # a healthy spike long before: its own incident, a warning (the explosion's escalates to critical)
STEP_SECONDS = 0.05


def _dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


# --- the queries in the dashboards ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    dashboard: str
    where: str  # panel title, "annotation: name" or "variable: name"
    ref_id: str
    kind: str  # sql or promql
    text: str
    format: str  # time_series or table (SQL)

    @property
    def key(self) -> str:
        return f"{self.dashboard}:{self.where}:{self.ref_id}"


def _queries() -> list[Query]:
    found = []
    for name, dash in _dashboards().items():
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                found.append(_query(name, panel["title"], panel.get("datasource"), target))
        for ann in dash.get("annotations", {}).get("list", []):
            found.append(_query(name, f"annotation: {ann['name']}", ann["datasource"], ann["target"]))
        for var in dash.get("templating", {}).get("list", []):
            found.append(Query(name, f"variable: {var['name']}", "var", _kind(var["datasource"]), var["query"],
                               "table"))
    return found


def _kind(datasource: dict[str, str]) -> str:
    return {POSTGRES_UID: "sql", PROMETHEUS_UID: "promql"}[datasource["uid"]]


def _query(dashboard: str, where: str, datasource: dict[str, str] | None, target: dict[str, Any]) -> Query:
    ds = target.get("datasource") or datasource
    assert ds is not None, f"{dashboard}: {where} has no data source"
    kind = _kind(ds)
    body = target["rawSql"] if kind == "sql" else target["expr"]
    return Query(dashboard, where, target["refId"], kind, body, target.get("format", "time_series"))


QUERIES = _queries()
SQL = [q for q in QUERIES if q.kind == "sql"]
PROMQL = [q for q in QUERIES if q.kind == "promql"]

# The columns each SQL query must answer with (Grafana reads time series, heatmap rows and annotations by name).
EXPECTED_COLUMNS = {
    "fleet.json:Active runs:A": ["run", "project", "status", "last step", "loss", "grad norm", "open incidents",
                                 "updated", "from_ms", "to_ms"],
    "fleet.json:Open incidents:A": ["run", "severity", "signature", "opened at step", "first layer", "message",
                                    "opened"],
    "run.json:Run:A": ["status", "last step", "steps", "open incidents", "first non-finite step"],
    "run.json:Loss:A": ["time", "loss"],
    "run.json:Gradient norm:A": ["time", "grad norm"],
    "run.json:Per-layer gradient norms:A": ["time", "metric", "value"],
    "run.json:Update / weight ratio:A": ["time", "update / weight", "worst layer"],
    "run.json:Learning rate:A": ["time", "learning rate"],
    "run.json:Non-finite steps:A": ["time", "loss", "grad norm"],
    "run.json:Incidents:A": ["#", "severity", "signature", "status", "opened", "last fired", "resolved",
                             "first layer", "message"],
    "run.json:annotation: Critical incidents:Anno": ["time", "timeend", "text", "tags"],
    "run.json:annotation: Warnings:Anno": ["time", "timeend", "text", "tags"],
    "run.json:annotation: First non-finite step:Anno": ["time", "text", "tags"],
    "run.json:variable: run:var": ["run_id"],
}
# Panels whose SQL reads the rollups: run at each level (the time range and $__interval_ms choose it).
ROLLUP_BACKED = {q.key for q in SQL if "step_rollups r, run, level" in q.text}
SERIES = {"run.json:Loss:A": "loss", "run.json:Gradient norm:A": "grad_norm"}


def test_the_committed_dashboards_are_what_the_generator_writes() -> None:
    done = subprocess.run([sys.executable, str(REPO / "tools" / "dashboards.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_dashboard_parses_and_names_its_data_sources_by_the_provisioned_uids() -> None:
    dashboards = _dashboards()
    assert set(dashboards) == {"fleet.json", "run.json"}
    for name, dash in dashboards.items():
        assert dash["uid"] and dash["title"] and dash["panels"], name
        for panel in dash["panels"]:
            if panel["type"] != "row":
                assert _kind(panel["datasource"]) in {"sql", "promql"}, (name, panel["title"])
    assert {q.key for q in SQL} == set(EXPECTED_COLUMNS), "a SQL query without expected columns, or one gone"
    assert len(ROLLUP_BACKED) == 6 and PROMQL
    assert set(LEVELS) - {1} == set(ROLLUP_WIDTHS), "the dashboards' levels are the rollups' widths"
    for key in ROLLUP_BACKED:
        sql = next(q.text for q in SQL if q.key == key)
        assert all(f"steps >= {w} * points THEN {w}" in sql for w in ROLLUP_WIDTHS), key


# --- a real gradwatch on PostgreSQL with an exploding run --------------------------------------------------------

@dataclass
class Seeded:
    server: ServerProcess
    schema: PostgresSchema
    run_id: str
    time_from: float
    time_to: float


def _exploding_steps(t0: float) -> list[dict[str, Any]]:
    """A long healthy run with one spike that recovers, then block2's gradients blow up first, the others
    following, then NaN and Inf."""
    base = [0.2, 1.0, 2.0, 0.5]
    steps = []
    for i in range(N_STEPS):
        wobble = 1 + 0.05 * math.sin(i * 0.37)
        growth = [math.exp(max(0, i - EXPLODES_AT - lag) * 0.03) for lag in (60, 40, 0, 30)]
        spike = 6.0 if i == SPIKE_AT else 1.0  # one step, every layer: a warning that recovers
        grads: list[Any] = [b * wobble * g * spike for b, g in zip(base, growth, strict=True)]
        weights = [10.0, 20.0, 20.0, 5.0]
        step: dict[str, Any] = {"step": i, "time": t0 + i * STEP_SECONDS,
                                "loss": 2.0 * math.exp(-i / 3000) + 0.1 + 0.01 * wobble
                                * math.exp(max(0, i - EXPLODES_AT - 100) * 0.02),
                                "grad_norm": math.hypot(*grads), "lr": 1e-3 * (0.5 + 0.5 * math.cos(i / N_STEPS)),
                                "layer_grad_norms": grads}
        if i % 10 == 0:
            updates = [1e-3 * w * g for w, g in zip(weights, growth, strict=True)]
            step |= {"update_norm": math.hypot(*updates), "layer_update_norms": updates,
                     "layer_weight_norms": weights}
        if i >= NAN_AT:
            step |= {"loss": "NaN", "grad_norm": "Infinity",
                     "layer_grad_norms": [grads[0], grads[1], "Infinity", "NaN"]}
        steps.append(step)
    return steps


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    require_postgres()
    schema = PostgresSchema()
    logs = tmp_path_factory.mktemp("dashboards")
    server = ServerProcess(schema.url, log_path=logs / "gradwatch.log")
    try:
        server.start()  # migrates with `gradwatch db upgrade` first
        run_id = new_run_id("dash")
        t0 = time.time() - N_STEPS * STEP_SECONDS - 60
        steps = _exploding_steps(t0)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.put(f"/v1/runs/{run_id}", json={"project": "dashboards", "layers": LAYERS}).status_code == 201
            for lo in range(0, N_STEPS, 1000):
                r = http.post(f"/v1/runs/{run_id}/steps", json={"steps": steps[lo:lo + 1000]})
                assert r.status_code == 200, r.text
            listed = http.get(f"/v1/runs/{run_id}/incidents").json()["incidents"]
            signatures = {e["signature"] for i in listed for e in i["evidence"]["timeline"]}  # one per episode
        assert "nonfinite" in signatures, signatures
        _wait_for_rollups(schema.url)
        yield Seeded(server, schema, run_id, t0 - 30, time.time() + 30)
    finally:
        server.stop()
        schema.drop()


def _wait_for_rollups(url: str, timeout_s: float = 30.0) -> None:
    """The server's rollup worker merges acknowledged steps after their commit: the dashboards read what it
    wrote, so the checks start once it holds every step."""
    engine = make_engine(url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with read_connection(engine) as conn:
                if not lagging_runs(conn):
                    return
            assert time.monotonic() < deadline, "the rollups did not catch up with the steps"
            time.sleep(0.05)
    finally:
        engine.dispose()


def grafana_sql(sql: str, *, time_from: float, time_to: float, interval_ms: int, run_id: str) -> str:
    """The SQL as Grafana's PostgreSQL data source sends it: macros expanded, the variable interpolated."""
    f, t = int(time_from), int(time_to)

    def iso(ts: int) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    out = re.sub(r"\$__unixEpochFilter\(([^)]+)\)", rf"\1 >= {f} AND \1 <= {t}", sql)
    out = re.sub(r"\$__timeFilter\(([^)]+)\)", rf"\1 BETWEEN '{iso(f)}' AND '{iso(t)}'", out)
    out = out.replace("$__unixEpochFrom()", str(f)).replace("$__unixEpochTo()", str(t))
    out = out.replace("$__interval_ms", str(interval_ms)).replace("${run}", run_id).replace("$run", run_id)
    assert "$" not in out, f"a macro or variable the test does not know: {out}"
    return out


# the points a panel can draw (time range / $__interval_ms) that make a 9,000-step run answer from each level
LEVELS = {16384: 0.5, 4096: 2, 1024: 8, 256: 32, 64: 100, 1: 1000}


def _run_as_reader(seeded: Seeded, sql: str) -> tuple[list[str], list[Any]]:
    engine = create_engine(seeded.schema.url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SET ROLE gradwatch_reader"))
            result = conn.exec_driver_sql(sql.replace("%", "%%"))
            return list(result.keys()), result.all()
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize(("query", "width"), [(q, w) for q in SQL for w in (LEVELS if q.key in ROLLUP_BACKED else [1])],
                         ids=lambda p: p.key if isinstance(p, Query) else f"width{p}")
def test_sql_runs_as_the_reader_and_answers_its_columns(seeded: Seeded, query: Query, width: int) -> None:
    span_ms = (int(seeded.time_to) - int(seeded.time_from)) * 1000
    sql = grafana_sql(query.text, time_from=seeded.time_from, time_to=seeded.time_to,
                      interval_ms=int(span_ms / LEVELS[width]), run_id=seeded.run_id)
    columns, rows = _run_as_reader(seeded, sql)
    assert columns == EXPECTED_COLUMNS[query.key]
    assert rows, f"{query.key} answered no row at width {width}"
    if query.key == "run.json:variable: run:var":
        assert (seeded.run_id,) in [tuple(r) for r in rows]
    if columns[0] == "time" and query.format == "time_series":
        assert all(isinstance(r[0], datetime) for r in rows)
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    if query.key in SERIES:
        _check_level(seeded, SERIES[query.key], width, rows)


def _check_level(seeded: Seeded, field: str, width: int, rows: list[Any]) -> None:
    """The query answered from the level asked for (a bucket's min and max, or every step), and the largest
    finite value survived it: an explosion is never averaged away."""
    _, stored = _run_as_reader(seeded, f"""
        SELECT count(*), max({field}) FROM steps s JOIN runs r ON r.id = s.run_pk
        WHERE r.run_id = '{seeded.run_id}' AND {field} NOT IN ('NaN', 'Infinity', '-Infinity')""")
    finite, largest = stored[0]
    if width == 1:
        assert len(rows) == finite
    else:
        assert len(rows) <= 2 * math.ceil(N_STEPS / width)
    assert max(r[1] for r in rows) == largest


def test_the_heatmap_names_the_layers_in_order_and_block2_lights_up_first(seeded: Seeded) -> None:
    query = next(q for q in SQL if q.where == "Per-layer gradient norms")
    span_ms = (int(seeded.time_to) - int(seeded.time_from)) * 1000
    sql = grafana_sql(query.text, time_from=seeded.time_from, time_to=seeded.time_to, interval_ms=span_ms // 1000,
                      run_id=seeded.run_id)
    _, rows = _run_as_reader(seeded, sql)
    assert sorted({r[1] for r in rows}) == [f"{i + 1:03d} {name}" for i, name in enumerate(LAYERS)]
    first_hot = min((r for r in rows if r[2] >= 1), key=lambda r: r[0])  # ten times its median in view
    assert first_hot[1] == "003 block2"


# --- Prometheus --------------------------------------------------------------------------------------------------

def grafana_promql(expr: str, run_id: str) -> str:
    out = expr.replace("$__rate_interval", "1m").replace("${run}", run_id).replace("$run", run_id)
    assert "$" not in out, f"a variable the test does not know: {out}"
    return out


@pytest.fixture(scope="module")
def prometheus(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO / "deploy" / "prometheus" / "rules.yml")],
        "scrape_configs": [{"job_name": "gradwatch",
                            "static_configs": [{"targets": [f"127.0.0.1:{seeded.server.port}"]}]}],
    }))
    server = prometheus_server(config, work)
    server.start()
    try:
        deadline = time.monotonic() + 30
        while not _instant(server.url, 'up{job="gradwatch"}')["result"]:
            assert time.monotonic() < deadline, "Prometheus never scraped gradwatch"
            time.sleep(0.5)
        # a second run keeps ingesting while Prometheus scrapes, so the rates have something to measure
        heartbeat = new_run_id("beat")
        with httpx.Client(base_url=seeded.server.url, timeout=30) as http:
            http.put(f"/v1/runs/{heartbeat}", json={"project": "dashboards"})
            for i in range(5):
                assert http.post(f"/v1/runs/{heartbeat}/steps", json={"steps": [
                    {"step": i * 10 + j, "loss": 1.0, "grad_norm": 1.0} for j in range(10)]}).status_code == 200
                time.sleep(1)
        yield server.url
    finally:
        server.stop()


def _instant(prometheus: str, expr: str) -> dict[str, Any]:
    answer = get_json(f"{prometheus}/api/v1/query?query={urllib.parse.quote(expr)}")
    assert answer["status"] == "success", answer
    return dict(answer["data"])


@pytest.mark.postgres
@pytest.mark.parametrize("query", PROMQL, ids=lambda q: f"{q.key}:{q.text[:40]}")
def test_promql_is_accepted_by_prometheus_and_returns_data(seeded: Seeded, prometheus: str, query: Query) -> None:
    expr = grafana_promql(query.text, seeded.run_id)
    deadline = time.monotonic() + 30
    while True:
        data = _instant(prometheus, expr)  # a rejected expression fails here, at once
        if data["result"] and (data["resultType"] != "vector" or _names_the_run(data["result"], seeded.run_id)):
            break
        assert time.monotonic() < deadline, f"no data for the seeded run from {expr!r}: {data}"
        time.sleep(1)


def _names_the_run(result: list[dict[str, Any]], run_id: str) -> bool:
    """A per-run answer has a series for the seeded run; any other answer needs only a series."""
    runs = {series["metric"].get("run") for series in result} - {None}
    return not runs or run_id in runs


# --- the README's picture ----------------------------------------------------------------------------------------

@pytest.mark.postgres
def test_plot_run_draws_a_run_read_back_through_the_api(seeded: Seeded, tmp_path: Path) -> None:
    out = tmp_path / "run.png"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "plot_run.py"), "--url", seeded.server.url,
                           "--run", seeded.run_id, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    incidents = httpx.get(f"{seeded.server.url}/v1/runs/{seeded.run_id}/incidents", timeout=30).json()["count"]
    assert f"{len(LAYERS)} layers, {incidents} incidents" in done.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
