"""Series queries on a long run cost what they return, not the run's length; and what the rollups cost ingest.

Run: `python bench/query.py [--quick] [--json] [--steps N] [--short S] [--layers L] [--repeat R] [--pairs P]
[--backends sqlite,postgres]`

Queries. Per database, a gradwatch (`gradwatch serve`, one worker) ingests two runs of L layers (default 50,
binary batches as the client sends them, the rollups kept by the rollup worker): a long one of N steps (default
10^6, --quick 50,000) and a short one of S steps (default 10,000, --quick 5,000). Per-layer gradient norms every step,
weight and update norms every 20th; the last 1 % of each run explodes in one layer and ends in NaN. Then the
series a dashboard refresh asks for, over the whole run, through GET /v1/runs/{id}/series: `series` (loss and
grad_norm, 1,000 points), `layer` (one layer's gradient norm, 1,000 points), `heatmap` (every layer's gradient
norm, 200 points). Each R times (default 30, --quick 5), long and short interleaved; p50 and p99 in ms, client
side (HTTP, JSON and all). Every answer is checked to hold the run's NaN and its largest finite gradient norm.

Ingest. P pairs (default 3, --quick 1) of bench/ingest.py's end-to-end ingest (4 clients, 46 layers, batches
of 1,000 steps, detection on) against a gradwatch that keeps the rollups (its rollup worker merges each batch
after the commit) and one that does not (bench/_without_rollups.py: the worker is told of nothing), in
alternating order: the median ratio of their throughputs. The rollups' cost against the code before them is
bench/ingest.py --against's measure.

JSON keys: per database `<db>_<query>_<long|short>_p50_ms` and `_p99_ms`, `<db>_long_vs_short`,
`<db>_ingest_values_per_s`, `<db>_ingest_without_rollups_values_per_s`, `<db>_ingest_rollups_ratio`; and over
the databases (the worse one): `series_p50_ms`, `layer_p50_ms`, `heatmap_p50_ms` (the long run's),
`long_vs_short` (the largest long ÷ short p50 of any query) and `ingest_rollups_ratio`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import struct
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchServer, emit, fresh_database, percentile, print_table  # noqa: E402
from ingest import end_to_end  # noqa: E402

from gradwatch.wire import BINARY_CONTENT_TYPE, BINARY_MAGIC, MISSING_BITS  # noqa: E402

QUERIES = {"series": {"fields": "loss,grad_norm", "max_points": 1000},
           "layer": {"fields": "layer_grad_norms", "layers": "layer7", "max_points": 1000},
           "heatmap": {"fields": "layer_grad_norms", "max_points": 200}}
TARGET_MS = {"series": 50.0, "layer": 50.0, "heatmap": 200.0}
BLOWS_UP = 7  # the layer that explodes (the `layer` query's)
BATCH = 10_000
INGEST_CLIENTS, INGEST_BATCH = 4, 1000


def run_columns(n: int, n_layers: int, lo: int, hi: int, seed: int) -> dict[str, np.ndarray]:
    """Steps lo..hi-1 of an n-step run: layer norms log-normal around levels of their own, loss falling; from
    99 % on one layer grows 2 % a step, loss and grad_norm with it, and the last 0.1 % are NaN / +Infinity."""
    rng = np.random.default_rng(seed + lo)
    k = hi - lo
    step = np.arange(lo, hi, dtype=np.int64)
    levels = np.random.default_rng(seed).uniform(-2.0, 1.0, n_layers)
    growth = np.exp(np.maximum(0, step - int(n * 0.99)) * 0.02)
    grads = np.exp(levels + rng.normal(0.0, 0.4, (k, n_layers)))
    grads[:, BLOWS_UP] *= growth
    loss = 2.0 * np.exp(-step / n + rng.normal(0.0, 0.1, k)) * growth
    grad_norm = np.sqrt((grads * grads).sum(axis=1))
    bad = step >= n - max(1, n // 1000)
    loss[bad], grad_norm[bad] = np.nan, np.inf
    missing = np.frombuffer(struct.pack("<Q", MISSING_BITS), dtype="<f8")[0]
    sampled = (step % 20 == 0)[:, None]
    weights = np.where(sampled, np.broadcast_to(10.0 + np.arange(n_layers), (k, n_layers)), missing)
    updates = np.where(sampled, 1e-3 * weights * growth[:, None], missing)
    return {"step": step, "time": 1.7e9 + step * 0.01, "loss": loss, "grad_norm": grad_norm,
            "lr": np.full(k, 3e-4), "layer_grad_norms": grads, "layer_weight_norms": weights,
            "layer_update_norms": updates}


def binary_body(columns: dict[str, np.ndarray], layers: list[str]) -> bytes:
    """A binary step batch (docs/wire.md) straight from numpy columns: the step column int64, every other
    column float64, little-endian, per-layer columns step-major."""
    fields = list(columns)
    head = json.dumps({"n": len(columns["step"]), "fields": fields, "layers": layers}).encode()
    parts = [columns["step"].astype("<i8").tobytes()]
    parts += [np.ascontiguousarray(columns[f], dtype="<f8").tobytes() for f in fields[1:]]
    return b"".join([BINARY_MAGIC, struct.pack("<I", len(head)), head, *parts])


class Api:
    """One keep-alive connection to a gradwatch."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=600)

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        self.conn.request(method, path, body, {"content-type": content_type} if body is not None else {})
        r = self.conn.getresponse()
        answer = r.read()
        if r.status not in (200, 201):
            raise SystemExit(f"{method} {path}: {r.status} {answer[:500]!r}")
        return json.loads(answer)

    def close(self) -> None:
        self.conn.close()


def ingest_run(api: Api, run_id: str, n: int, n_layers: int) -> tuple[float, float]:
    """Seconds the run's POSTs took, and the exploding layer's largest gradient norm."""
    layers = [f"layer{k}" for k in range(n_layers)]
    api.call("PUT", f"/v1/runs/{run_id}", json.dumps({"project": "bench", "layers": layers}).encode())
    took, peak = 0.0, -np.inf
    batch = max(1, min(BATCH, 450_000 // (8 + 3 * n_layers)))  # within GRADWATCH_MAX_BATCH_VALUES (500,000)
    for lo in range(0, n, batch):
        columns = run_columns(n, n_layers, lo, min(n, lo + batch), seed=n)
        peak = max(peak, float(columns["layer_grad_norms"][:, BLOWS_UP].max()))
        body = binary_body(columns, layers)
        start = time.perf_counter()
        api.call("POST", f"/v1/runs/{run_id}/steps", body, BINARY_CONTENT_TYPE)
        took += time.perf_counter() - start
    return took, peak


def check_answer(name: str, answer: dict[str, Any], n_layers: int, peak: float) -> None:
    """What a downsample must keep: the NaN the run ends in, and the exploding layer's largest value."""
    series = answer["series"]
    if name == "series":
        loss = next(s for s in series if s["field"] == "loss")
        assert "NaN" in loss["values"], "series: the run's NaN is not in the answer"
        return
    if name == "heatmap":
        assert len(series) == n_layers, f"heatmap: {len(series)} series for {n_layers} layers"
    exploding = next(s for s in series if s["layer"] == f"layer{BLOWS_UP}")
    found = max(v for v in exploding["values"] if isinstance(v, float))
    assert found == peak, f"{name}: the largest value answered is {found}, the run's is {peak}"


def time_queries(api: Api, runs: dict[str, tuple[str, float]], n_layers: int, repeat: int) -> dict[str, list[float]]:
    """Each query on each run (name -> run id, its peak), interleaved; the first answers checked."""
    times: dict[str, list[float]] = {f"{q}_{length}": [] for q in QUERIES for length in runs}
    for i in range(repeat):
        for q, params in QUERIES.items():
            for length, (run_id, peak) in runs.items():
                path = f"/v1/runs/{run_id}/series?{urllib.parse.urlencode(params)}"
                start = time.perf_counter()
                answer = api.call("GET", path)
                times[f"{q}_{length}"].append((time.perf_counter() - start) * 1000)
                if i == 0:
                    check_answer(q, answer, n_layers, peak)
    return times


def query_figures(backend: str, n_long: int, n_short: int, n_layers: int, repeat: int,
                  workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with fresh_database(backend, workdir) as url:
        server = BenchServer(url, workdir / f"query-{backend}.log")
        server.start()
        api = Api(server.url)
        try:
            seconds, long_peak = ingest_run(api, "long", n_long, n_layers)
            out["ingest_long_s"] = round(seconds, 1)
            _, short_peak = ingest_run(api, "short", n_short, n_layers)
            times = time_queries(api, {"long": ("long", long_peak), "short": ("short", short_peak)}, n_layers,
                                 repeat)
        finally:
            api.close()
            server.stop()
    for key, values in times.items():
        out[f"{key}_p50_ms"] = round(statistics.median(values), 1)
        out[f"{key}_p99_ms"] = round(percentile(values, 0.99), 1)
    out["long_vs_short"] = round(max(out[f"{q}_long_p50_ms"] / out[f"{q}_short_p50_ms"] for q in QUERIES), 2)
    return out


def ingest_figures(backend: str, n_steps: int, pairs: int, workdir: Path) -> dict[str, Any]:
    """Median throughput with and without rollups, and the median ratio of pairs run back to back."""
    here = Path(__file__).resolve().parent
    rates: dict[bool, list[float]] = {True: [], False: []}
    ratios = []
    with fresh_database(backend, workdir) as url:
        for k in range(pairs):
            pair: dict[bool, float] = {}
            for with_rollups in ((True, False) if k % 2 == 0 else (False, True)):
                server = BenchServer(url, workdir / f"ingest-{backend}.log",
                                     launcher=None if with_rollups else [str(here / "_without_rollups.py")])
                server.start()
                try:
                    pair[with_rollups], _ = end_to_end(server.url, INGEST_CLIENTS, n_steps, INGEST_BATCH, server,
                                                       prefix=f"{'on' if with_rollups else 'off'}{k}")
                finally:
                    server.stop()
                rates[with_rollups].append(pair[with_rollups])
            ratios.append(pair[True] / pair[False])
    return {"ingest_values_per_s": round(statistics.median(rates[True])),
            "ingest_without_rollups_values_per_s": round(statistics.median(rates[False])),
            "ingest_rollups_ratio": round(statistics.median(ratios), 3),
            "ingest_rollups_ratio_pairs": [round(r, 3) for r in ratios]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small enough for CI")
    ap.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    ap.add_argument("--steps", type=int, help="the long run's steps (default 1,000,000; quick 50,000)")
    ap.add_argument("--short", type=int, help="the short run's steps (default 10,000; quick 5,000)")
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--repeat", type=int, help="times each query runs (default 30, quick 5)")
    ap.add_argument("--pairs", type=int, help="ingest pairs with and without rollups (default 3, quick 1)")
    ap.add_argument("--ingest-steps", type=int, help="steps per ingest client (default 10,000, quick 2,000)")
    ap.add_argument("--backends", default="sqlite,postgres")
    args = ap.parse_args()
    n_long = args.steps or (50_000 if args.quick else 1_000_000)
    n_short = args.short or (5_000 if args.quick else 10_000)
    repeat = args.repeat or (5 if args.quick else 30)
    pairs = args.pairs or (1 if args.quick else 3)
    ingest_steps = args.ingest_steps or (2_000 if args.quick else 10_000)
    figures: dict[str, Any] = {"steps": n_long, "short_steps": n_short, "layers": args.layers}
    names = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-query-") as tmp:
        for backend in args.backends.split(","):
            name = "postgres" if backend.startswith("postgres") else "sqlite"
            names.append(name)
            workdir = Path(tmp) / name
            workdir.mkdir()
            found = query_figures(backend, n_long, n_short, args.layers, repeat, workdir)
            found |= ingest_figures(backend, ingest_steps, pairs, workdir)
            figures |= {f"{name}_{key}": value for key, value in found.items()}
            if not args.json:
                rows: list[tuple[str, Any]] = [
                    (f"{q}: p50 / p99, {n_long:,} steps | {n_short:,} steps (target p50 {TARGET_MS[q]:.0f})",
                     f"{found[q + '_long_p50_ms']} / {found[q + '_long_p99_ms']} | "
                     f"{found[q + '_short_p50_ms']} / {found[q + '_short_p99_ms']}") for q in QUERIES]
                rows += [("long ÷ short p50, the largest (target ≤ 2)", found["long_vs_short"]),
                         ("ingest values/s with rollups / without", f"{found['ingest_values_per_s']:,} / "
                                                                     f"{found['ingest_without_rollups_values_per_s']:,}"),
                         ("ingest with ÷ without rollups, median of pairs (target ≥ 0.8)",
                          f"{found['ingest_rollups_ratio']} {found['ingest_rollups_ratio_pairs']}")]
                print_table(f"series queries, {name}: {args.layers} layers, ms over HTTP "
                            f"(the long run's ingest took {found['ingest_long_s']} s)", rows)
    for q in QUERIES:
        figures[f"{q}_p50_ms"] = max(figures[f"{n}_{q}_long_p50_ms"] for n in names)
    figures["long_vs_short"] = max(figures[f"{n}_long_vs_short"] for n in names)
    figures["ingest_rollups_ratio"] = min(figures[f"{n}_ingest_rollups_ratio"] for n in names)
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
