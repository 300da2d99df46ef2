"""Soak: sustained ingest from 50 concurrent runs for a long time; throughput, latency and the service's memory
over time. The service must stay flat: no RSS growth trend over the last half, p99 latency stable.

A real `gradwatch serve` (one worker, detection and metrics on, /metrics scraped every 5 s as Prometheus would)
on SQLite or PostgreSQL; client processes, each driving some of the runs, one thread and one keep-alive
connection per run. Every run sends a batch of `--batch` steps × 50 values (loss, grad norm, lr, update norm and
46 per-layer gradient norms, binary columns as the client sends them) every `--period` seconds, waiting for each
answer (a closed loop, as gradwatch's sender does: a slow service slows the runs down instead of piling requests
up). The values are a healthy run's, drawn once per client process and reused with new step numbers.
Per interval (`--interval`): steps and values per second, p50/p99 latency of a batch, the service's RSS, and
the share of the machine's CPU time the hypervisor gave to others (`steal_pct`, from /proc/stat): on a shared
virtual machine, stolen seconds stall every process at once, and the `_calm` p99s leave out the intervals with
any (over 1 %), so that what the service does and what its host does can be told apart.
With `--probe-memory` the service runs under bench/_memory_probe.py, and `memory` tells where RSS went: the
allocators' in-use bytes and live Python objects (a leak grows those) against memory malloc keeps freed.
Run: `python bench/soak.py [--seconds 600] [--backend sqlite|postgres] [--probe-memory] [--quick] [--json]`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchServer, emit, fresh_database, percentile, print_table, rss_mb  # noqa: E402

from gradwatch.wire import BINARY_CONTENT_TYPE, encode_binary_batch  # noqa: E402

N_LAYERS = 46
VALUES_PER_STEP = 4 + N_LAYERS
LAYERS = [f"blocks.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(N_LAYERS)]
POOL_STEPS = 2_000  # distinct value rows per client process, cycled through with new step numbers


def value_rows(seed: int) -> list[dict[str, Any]]:
    """A healthy run's values: layer norms log-normal around levels of their own, a noisy loss."""
    rng = random.Random(seed)
    levels = [rng.uniform(-2.0, 1.0) for _ in range(N_LAYERS)]
    rows = []
    for _ in range(POOL_STEPS):
        g = [math.exp(level + rng.gauss(0.0, 0.4)) for level in levels]
        rows.append({"loss": 2.0 * math.exp(rng.gauss(0.0, 0.1)), "grad_norm": math.sqrt(sum(x * x for x in g)),
                     "lr": 3e-4, "update_norm": 0.05 * math.exp(rng.gauss(0.0, 0.3)), "layer_grad_norms": g})
    return rows


def drive_run(url: str, run_id: str, rows: list[dict[str, Any]], batch: int, period: float, start_at: float,
              end_at: float, out: list[tuple[float, float, int, int]]) -> None:
    """One run: a batch every `period` s from `start_at` (staggered) to `end_at`; (done_at, latency_s, values,
    status) per batch into `out`."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("PUT", f"/v1/runs/{run_id}", json.dumps({"project": "soak", "layers": LAYERS}),
                     {"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status not in (200, 201):
            raise SystemExit(f"PUT run failed: {r.status}")
        step, k = 0, 0
        next_at = start_at
        while True:
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            if time.monotonic() >= end_at:
                return
            steps = [{"step": step + i, **rows[(step + i) % len(rows)]} for i in range(batch)]
            body = encode_binary_batch({"batch_id": f"{run_id}-{k}", "layers": LAYERS, "steps": steps})
            t0 = time.monotonic()
            conn.request("POST", f"/v1/runs/{run_id}/steps", body, {"content-type": BINARY_CONTENT_TYPE})
            r = conn.getresponse()
            r.read()
            t1 = time.monotonic()
            out.append((t1, t1 - t0, batch * VALUES_PER_STEP if r.status == 200 else 0, r.status))
            step += batch
            k += 1
            next_at = max(next_at + period, t1)  # closed loop: never more than one batch in flight per run
    finally:
        conn.close()


def client_process(url: str, run_ids: list[str], seed: int, batch: int, period: float, start_at: float,
                   end_at: float, results: Any) -> None:
    rows = value_rows(seed)
    outs: list[list[tuple[float, float, int, int]]] = [[] for _ in run_ids]
    threads = []
    for i, run_id in enumerate(run_ids):
        stagger = start_at + period * (i / max(1, len(run_ids)))
        threads.append(threading.Thread(target=drive_run, args=(url, run_id, rows, batch, period, stagger, end_at,
                                                                outs[i]), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put([rec for out in outs for rec in out])


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    xs, ys = [t for t, _ in samples], [v for _, v in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 0.0 if sxx == 0 else 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def soak(backend: str, runs: int, procs: int, seconds: float, interval: float, batch: int, period: float,
         scrape_s: float, workdir: Path, probe_memory: bool = False) -> dict[str, Any]:
    probe = workdir / "memory.jsonl"
    launcher = {"launcher": [str(Path(__file__).with_name("_memory_probe.py"))],
                "env": {"GRADWATCH_MEMORY_PROBE": str(probe), "GRADWATCH_MEMORY_PROBE_EVERY": str(min(5.0, interval))}}
    with fresh_database(backend, workdir) as url:
        server = BenchServer(url, workdir / f"soak-{backend}.log", **(launcher if probe_memory else {}))
        server.start()
        try:
            figures = _measure(server, runs, procs, seconds, interval, batch, period, scrape_s)
        finally:
            server.stop()
    if probe_memory:
        figures["memory"] = memory_figures([json.loads(line) for line in probe.read_text().splitlines()], seconds)
    return figures


PROBED = ("rss_anon_mb", "malloc_in_use_mb", "malloc_free_mb", "pymalloc_arenas_mb", "pymalloc_in_use_mb",
          "python_blocks", "gc_objects", "threads")


def memory_figures(samples: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    """Each probed quantity at the soak's start and end and its slope per minute over the last half. The probe's
    clock starts with the server, a few seconds before the soak: the soak's own start is its last `seconds`."""
    end = samples[-1]["t_s"]
    start = end - seconds
    last_half = [s for s in samples if s["t_s"] >= start + seconds / 2]
    first = next((s for s in samples if s["t_s"] >= start), samples[0])
    return {key: {"start": first[key], "end": samples[-1][key],
                  "slope_per_min_last_half": round(slope_per_min([(s["t_s"], s[key]) for s in last_half]), 3)}
            for key in PROBED}


def cpu_jiffies() -> tuple[int, int] | None:
    """The machine's (stolen, total) CPU time so far, in jiffies (/proc/stat's first line); None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return fields[7], sum(fields)


def _measure(server: BenchServer, runs: int, procs: int, seconds: float, interval: float, batch: int,
             period: float, scrape_s: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    run_ids = [f"soak-{k:03d}-{random.getrandbits(32):08x}" for k in range(runs)]
    start_at = time.monotonic() + 3.0  # time for the client processes to start and create their runs
    end_at = start_at + seconds
    workers = [ctx.Process(target=client_process, args=(server.url, run_ids[p::procs], p, batch, period, start_at,
                                                        end_at, results), daemon=True) for p in range(procs)]
    for w in workers:
        w.start()
    rss: list[tuple[float, float]] = []
    anon: list[tuple[float, float]] = []
    cpu: list[tuple[float, tuple[int, int] | None]] = []
    scrapes = 0
    next_scrape = start_at
    while time.monotonic() < start_at:
        time.sleep(0.05)
    while (now := time.monotonic()) < end_at:
        rss.append((now - start_at, rss_mb(server.pid)))
        anon.append((now - start_at, rss_mb(server.pid, "RssAnon")))
        cpu.append((now - start_at, cpu_jiffies()))
        if now >= next_scrape:
            with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
                r.read()
            scrapes += 1
            next_scrape += scrape_s
        time.sleep(max(0.0, min(1.0, end_at - time.monotonic())))
    rss.append((time.monotonic() - start_at, rss_mb(server.pid)))
    anon.append((time.monotonic() - start_at, rss_mb(server.pid, "RssAnon")))
    cpu.append((time.monotonic() - start_at, cpu_jiffies()))
    records: list[tuple[float, float, int, int]] = []
    for _ in workers:
        records += results.get(timeout=seconds + 120)
    for w in workers:
        w.join(30)
    return _figures(records, rss, anon, start_at, seconds, interval, runs, scrapes, cpu)


def steal_pct(cpu: list[tuple[float, tuple[int, int] | None]], lo: float, hi: float) -> float | None:
    """The share of the machine's CPU time stolen between two moments (the samples nearest inside them)."""
    inside = [j for t, j in cpu if lo <= t <= hi + 1.0 and j is not None]
    if len(inside) < 2 or inside[-1][1] == inside[0][1]:
        return None
    return round(100.0 * (inside[-1][0] - inside[0][0]) / (inside[-1][1] - inside[0][1]), 2)


def _figures(records: list[tuple[float, float, int, int]], rss: list[tuple[float, float]],
             anon: list[tuple[float, float]], start_at: float,
             seconds: float, interval: float, runs: int, scrapes: int,
             cpu: list[tuple[float, tuple[int, int] | None]]) -> dict[str, Any]:
    ok = [(t - start_at, lat, v) for t, lat, v, status in records if status == 200]
    errors = sum(1 for *_, status in records if status != 200)
    n_intervals = max(1, math.ceil(seconds / interval))
    series: list[dict[str, Any]] = []
    for i in range(n_intervals):
        lo, hi = i * interval, min(seconds, (i + 1) * interval)
        inside = [(lat, v) for t, lat, v in ok if lo <= t < hi or (i == n_intervals - 1 and t >= hi)]
        lats = [lat * 1000 for lat, _ in inside]
        in_rss = [mb for t, mb in rss if lo <= t <= hi] or [rss[-1][1]]
        series.append({"t_s": round(hi, 1), "values_per_s": round(sum(v for _, v in inside) / (hi - lo)),
                       "batches": len(inside), "p50_ms": round(percentile(lats, 0.5), 2),
                       "p99_ms": round(percentile(lats, 0.99), 2), "rss_mb": round(in_rss[-1], 1),
                       "steal_pct": steal_pct(cpu, lo, hi)})
    half = seconds / 2
    stolen = [(row["t_s"] - interval, row["t_s"]) for row in series if (row["steal_pct"] or 0.0) > 1.0]

    def calm_p99(first: bool) -> float:
        lats = [lat * 1000 for t, lat, _ in ok if (t < half) == first and not any(a <= t < b for a, b in stolen)]
        return round(percentile(lats, 0.99), 2) if lats else math.nan
    all_lat = [lat * 1000 for _, lat, _ in ok]
    last_half = [(t, mb) for t, mb in rss if t >= half]
    first_interval_rss = [mb for t, mb in rss if t <= interval] or [rss[0][1]]
    return {
        "runs": runs, "seconds": seconds, "batches": len(ok), "errors": errors, "scrapes": scrapes,
        "throughput_values_per_s": round(sum(v for *_, v in ok) / seconds),
        "p50_ms": round(percentile(all_lat, 0.5), 2),
        "p99_ms": round(percentile(all_lat, 0.99), 2),
        "p99_ms_first_half": round(percentile([lat * 1000 for t, lat, _ in ok if t < half], 0.99), 2),
        "p99_ms_second_half": round(percentile([lat * 1000 for t, lat, _ in ok if t >= half], 0.99), 2),
        "steal_pct": steal_pct(cpu, 0.0, seconds),
        "intervals_with_steal": len(stolen),
        "p99_ms_first_half_calm": calm_p99(True),
        "p99_ms_second_half_calm": calm_p99(False),
        "rss_mb_start": round(first_interval_rss[-1], 1),
        "rss_mb_end": round(rss[-1][1], 1),
        "rss_mb_max": round(max(mb for _, mb in rss), 1),
        "rss_slope_mb_per_min_last_half": round(slope_per_min(last_half), 3),
        "rss_anon_mb_end": round(anon[-1][1], 1),
        "rss_anon_slope_mb_per_min_last_half": round(slope_per_min([(t, mb) for t, mb in anon if t >= half]), 3),
        "series": series,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    ap.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    ap.add_argument("--seconds", type=float, help="how long to soak (default 600, quick 6)")
    ap.add_argument("--interval", type=float, help="seconds per row of the time series (default 30, quick 1)")
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--runs", type=int, default=50, help="concurrent runs")
    ap.add_argument("--procs", type=int, default=4, help="client processes the runs are spread over")
    ap.add_argument("--batch", type=int, default=100, help="steps per batch")
    ap.add_argument("--period", type=float, default=1.0, help="seconds between a run's batches")
    ap.add_argument("--probe-memory", action="store_true",
                    help="run the service under bench/_memory_probe.py and report where its memory is")
    args = ap.parse_args()
    seconds = args.seconds or (6.0 if args.quick else 600.0)
    interval = args.interval or (1.0 if args.quick else 30.0)
    with tempfile.TemporaryDirectory() as tmp:
        figures = soak(args.backend, args.runs, args.procs, seconds, interval, args.batch, args.period,
                       scrape_s=1.0 if args.quick else 5.0, workdir=Path(tmp), probe_memory=args.probe_memory)
    if args.json:
        emit(figures, True)
    else:
        print_table(f"soak: {args.runs} runs × {args.batch}-step batches every {args.period:g} s, {seconds:g} s on "
                    f"{args.backend}", [(k, v) for k, v in figures.items() if k not in ("series", "memory")])
        print(f"{'t (s)':>8} {'values/s':>12} {'batches':>8} {'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>8}")
        for row in figures["series"]:
            print(f"{row['t_s']:>8} {row['values_per_s']:>12,} {row['batches']:>8} {row['p50_ms']:>8} "
                  f"{row['p99_ms']:>8} {row['rss_mb']:>8}")
        if "memory" in figures:
            print(f"{'memory':>18} {'start':>12} {'end':>12} {'/min, last half':>16}")
            for key, m in figures["memory"].items():
                print(f"{key:>18} {m['start']:>12,} {m['end']:>12,} {m['slope_per_min_last_half']:>16,}")
    return 1 if figures["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
