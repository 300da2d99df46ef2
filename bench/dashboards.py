"""How long the Run dashboard's rollup-backed SQL takes on a long run, at the level it picks and on raw steps.

Run: `python bench/dashboards.py [--quick] [--json] [--steps N] [--layers L]`

A gradwatch on a fresh PostgreSQL schema ingests one run of N steps (default 10^6, --quick 20,000) with L layers
(binary batches, as the client sends them; the rollups are kept up to date by ingest) whose last 2 % explode
and end in NaN. Then each time-panel query of deploy/grafana/dashboards/run.json runs with Grafana's macros
expanded for the whole run's time range and a 1,000-point panel, as the read-only role: once as the dashboard
sends it (it picks a rollup level) and once forced onto the raw steps (an $__interval_ms that asks for a point
per step). Median of 3 runs each, in ms of database time (the rows are counted in the database, not fetched),
and the rows the panel would get. JSON keys: `steps`, and per panel
`<panel>_ms`, `<panel>_raw_ms`, `<panel>_rows`, `<panel>_raw_rows`, `<panel>_width`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, BenchServer, emit, fresh_database, print_table  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from gradwatch.wire import BINARY_CONTENT_TYPE, encode_binary_batch  # noqa: E402

PANELS = {"Loss": "loss", "Gradient norm": "grad_norm", "Per-layer gradient norms": "heatmap",
          "Update / weight ratio": "update_ratio", "Learning rate": "lr", "Non-finite steps": "nonfinite"}
POINTS = 1000  # a panel about 1,000 pixels wide (the heatmap asks for 250: its maxDataPoints)
STEP_SECONDS = 0.01


def make_steps(lo: int, hi: int, n: int, layers: int, t0: float) -> list[dict[str, Any]]:
    explode_at, nan_at = int(n * 0.98), int(n * 0.995)
    out = []
    for i in range(lo, hi):
        growth = math.exp(max(0, i - explode_at) * 0.01)
        g = [(0.5 + 0.1 * k) * (1 + 0.05 * math.sin(i * 0.1 + k)) * (growth if k == 1 else 1.0)
             for k in range(layers)]
        step: dict[str, Any] = {"step": i, "time": t0 + i * STEP_SECONDS, "loss": 2.0 * math.exp(-i / n) * growth,
                                "grad_norm": math.sqrt(sum(x * x for x in g)), "lr": 3e-4, "layer_grad_norms": g}
        if i % 20 == 0:
            w = [10.0 + k for k in range(layers)]
            u = [1e-3 * x * growth for x in w]
            step |= {"update_norm": math.sqrt(sum(x * x for x in u)), "layer_update_norms": u,
                     "layer_weight_norms": w}
        if i >= nan_at:
            step |= {"loss": math.nan, "grad_norm": math.inf}
        out.append(step)
    return out


def ingest(url: str, run_id: str, n: int, layers: int, t0: float, batch: int = 10_000) -> float:
    names = [f"layer{k}" for k in range(layers)]
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request("PUT", f"/v1/runs/{run_id}", json.dumps({"project": "bench", "layers": names}),
                 {"content-type": "application/json"})
    conn.getresponse().read()
    start = time.perf_counter()
    for lo in range(0, n, batch):
        body = encode_binary_batch({"layers": names, "steps": make_steps(lo, min(n, lo + batch), n, layers, t0)})
        conn.request("POST", f"/v1/runs/{run_id}/steps", body, {"content-type": BINARY_CONTENT_TYPE})
        r = conn.getresponse()
        answer = r.read()
        if r.status != 200:
            raise SystemExit(f"ingest failed: {r.status} {answer[:500]!r}")
    conn.close()
    return time.perf_counter() - start


def expand(sql: str, time_from: int, time_to: int, interval_ms: float, run_id: str) -> str:
    """Grafana's PostgreSQL macros and the run variable, as the data source sends them."""
    out = re.sub(r"\$__unixEpochFilter\(([^)]+)\)", rf"\1 >= {time_from} AND \1 <= {time_to}", sql)
    out = out.replace("$__unixEpochFrom()", str(time_from)).replace("$__unixEpochTo()", str(time_to))
    return out.replace("$__interval_ms", repr(interval_ms)).replace("${run}", run_id)


def timed(url: str, sql: str, width_sql: str) -> tuple[float, int, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SET ROLE gradwatch_reader"))
            width = int(conn.exec_driver_sql(width_sql.replace("%", "%%")).scalar_one())
            times, rows = [], 0
            for _ in range(3):
                start = time.perf_counter()
                rows = int(conn.exec_driver_sql(f"SELECT count(*) FROM ({sql.replace('%', '%%')}) AS panel")
                           .scalar_one())
                times.append((time.perf_counter() - start) * 1000)
            return statistics.median(times), rows, width
    finally:
        engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    n = args.steps or (20_000 if args.quick else 1_000_000)
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "run.json").read_text())
    queries = {PANELS[p["title"]]: p["targets"][0]["rawSql"] for p in dashboard["panels"] if p["title"] in PANELS}
    figures: dict[str, Any] = {"steps": n, "layers": args.layers}
    with tempfile.TemporaryDirectory() as tmp, fresh_database("postgres", Path(tmp)) as url:
        server = BenchServer(url, Path(tmp) / "gradwatch.log")
        server.start()
        try:
            run_id = f"bench-{uuid.uuid4().hex[:8]}"
            t0 = time.time() - n * STEP_SECONDS - 60
            figures["ingest_s"] = ingest(server.url, run_id, n, args.layers, t0)
        finally:
            server.stop()
        time_from, time_to = int(t0) - 1, int(t0 + n * STEP_SECONDS) + 2
        span_ms = (time_to - time_from) * 1000
        for name, sql in queries.items():
            # the level the query picks: its own CTEs, asked for the width alone
            head = sql[:sql.index("), raw AS (")] + ")\nSELECT width FROM level"
            for suffix, points in (("", POINTS // 4 if name == "heatmap" else POINTS), ("_raw", n * 10)):
                interval = span_ms / points
                ms, rows, width = timed(url, expand(sql, time_from, time_to, interval, run_id),
                                        expand(head, time_from, time_to, interval, run_id))
                figures[f"{name}{suffix}_ms"] = round(ms, 1)
                figures[f"{name}{suffix}_rows"] = rows
                if not suffix:
                    figures[f"{name}_width"] = width
    if not args.json:
        print_table(f"Run dashboard SQL, one run of {n:,} steps and {args.layers} layers, PostgreSQL "
                    f"(ingest {figures['ingest_s']:.0f} s), median of 3, ms",
                    [(f"{name}: level {figures[name + '_width']} ({figures[name + '_rows']:,} rows) / raw "
                      f"({figures[name + '_raw_rows']:,} rows)",
                      f"{figures[name + '_ms']:,.1f} / {figures[name + '_raw_ms']:,.1f}") for name in queries])
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
