"""End-to-end ingest throughput vs. the raw insert rate of the same table through the same driver.

A real `gradwatch serve` (uvicorn) in a subprocess; 4 client processes, each sending one run of steps with
50 values per step (loss, grad norm, lr, update norm and 46 per-layer gradient norms) in batches over one
keep-alive HTTP connection, encoded as the client sends them by default (binary columns, `--wire binary`) or
as gzip'd JSON (`--wire json`; `--wire both` measures both against the same raw rate). Bodies are encoded
before the clock starts: this measures the service, not the clients. The raw rate inserts the same rows, batch
by batch, one transaction per batch, with the database driver alone (no HTTP, no validation).

`--alerting on` measures the service as it runs with its alert paths in use: metrics on, one webhook
subscription to a receiver in this process, and a scraper reading /metrics every second while the clients send;
`--alerting off` (the default) sets GRADWATCH_METRICS=false and subscribes nobody; `--alerting both` measures
back-to-back pairs of the two in alternating order and reports the median ratio. The steps are healthy, so
incidents (and webhooks) are rare: what a webhook costs per incident is bench/alert_latency.py's figure.
`--against PATH` compares this tree with another checkout of gradwatch (made with, say, `git worktree add
/tmp/gw-410af75 410af75`) in back-to-back pairs, in alternating order, on each database: the same clients and
bodies, this virtualenv, the other checkout's service code (`gradwatch_service`, its migrations and the client
package it imports) put first on the server's PYTHONPATH. It prints each side's median, every pair's ratio
(this tree ÷ the other) and their median, the service's CPU a step on each side (user + system from /proc,
from its start to the last acknowledgement and, for this tree, until the rollups hold every step; its pairs'
ratio moves less than values/s where other processes share the machine), and for this tree how long after the
last acknowledgement the step rollups held every step (the rollup worker merges them after the commit).
Run: `python bench/ingest.py [--quick] [--json] [--wire binary|json|both] [--detection on|off]
[--alerting on|off|both] [--pairs N] [--against PATH]`.
"""

from __future__ import annotations

import argparse
import gzip
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
from _common import BenchServer, Receiver, cpu_s, emit, fresh_database, post_json, print_table, rss_mb  # noqa: E402

from gradwatch.wire import BINARY_CONTENT_TYPE, encode_binary_batch  # noqa: E402

N_LAYERS = 46
VALUES_PER_STEP = 4 + N_LAYERS
LAYERS = [f"blocks.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(N_LAYERS)]


def make_steps(n: int, seed: int) -> list[dict[str, Any]]:
    """A healthy-looking run: layer norms log-normal around levels of their own, a slowly falling noisy loss."""
    rng = random.Random(seed)
    levels = [rng.uniform(-2.0, 1.0) for _ in range(N_LAYERS)]
    steps = []
    for i in range(n):
        g = [math.exp(level + rng.gauss(0.0, 0.4)) for level in levels]
        steps.append({"step": i, "time": 1.7e9 + i, "loss": 2.0 * math.exp(-i / 20_000 + rng.gauss(0.0, 0.1)),
                      "grad_norm": math.sqrt(sum(x * x for x in g)), "lr": 3e-4,
                      "update_norm": 0.05 * math.exp(rng.gauss(0.0, 0.3)), "layer_grad_norms": g})
    return steps


def batches(steps: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [steps[i: i + size] for i in range(0, len(steps), size)]


def client(url: str, run_id: str, n_steps: int, batch_size: int, seed: int, start: Any, done: Any,
           use_gzip: bool = True, wire: str = "binary") -> None:
    host, port = url.removeprefix("http://").split(":")
    if wire == "binary":  # what gradwatch's sender posts by default (HttpTransport): not gzipped
        bodies = [encode_binary_batch({"batch_id": f"{run_id}-{k}", "layers": LAYERS, "steps": b})
                  for k, b in enumerate(batches(make_steps(n_steps, seed), batch_size))]
        headers = {"content-type": BINARY_CONTENT_TYPE}
    else:
        bodies = [json.dumps({"batch_id": f"{run_id}-{k}", "steps": b}).encode()
                  for k, b in enumerate(batches(make_steps(n_steps, seed), batch_size))]
        if use_gzip:
            bodies = [gzip.compress(body, 1) for body in bodies]
        headers = {"content-type": "application/json", **({"content-encoding": "gzip"} if use_gzip else {})}
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("PUT", f"/v1/runs/{run_id}", json.dumps({"project": "bench", "layers": LAYERS}),
                 {"content-type": "application/json"})
    assert conn.getresponse().read() and True
    start.wait()
    for body in bodies:
        conn.request("POST", f"/v1/runs/{run_id}/steps", body, headers)
        r = conn.getresponse()
        payload = r.read()
        if r.status != 200:
            raise SystemExit(f"ingest failed: {r.status} {payload[:300]!r}")
    conn.close()
    done.put(time.perf_counter())


class Scraper:
    """Reads /metrics every `period` seconds from `start()` to `stop()`, as Prometheus would."""

    def __init__(self, url: str, period: float = 1.0) -> None:
        self.url, self.period = url + "/metrics", period
        self.scrapes = 0
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=30) as r:
                    r.read()
            except Exception as exc:  # said by stop(): a failing scrape must not pass for a cheap one
                self.error = exc
                return
            self.scrapes += 1
            next_at += self.period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"scraping {self.url} failed: {self.error}")
        return self.scrapes


def end_to_end(url: str, n_clients: int, n_steps: int, batch_size: int, server: BenchServer,
               use_gzip: bool = True, wire: str = "binary", prefix: str = "bench",
               scraper: Scraper | None = None, settled: Any = None) -> tuple[float, float]:
    """Values per second from the start to the last client's last acknowledgement, and the service's peak RSS.
    With `settled` (a callable), it is called once that is measured and until it answers True (seconds after the
    last acknowledgement go to `server.settled_s`)."""
    ctx = mp.get_context("spawn")
    start, done = ctx.Barrier(n_clients + 1), ctx.Queue()
    procs = [ctx.Process(target=client, args=(url, f"{prefix}-{k}", n_steps, batch_size, k, start, done, use_gzip,
                                              wire))
             for k in range(n_clients)]
    for p in procs:
        p.start()
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(server.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start.wait()
    t0 = time.perf_counter()
    if scraper is not None:
        scraper.start()
    ends = [done.get(timeout=600) for _ in procs]
    if settled is not None:
        while not settled():
            time.sleep(0.002)
        server.settled_s = time.perf_counter() - max(ends)
    if scraper is not None:
        scraper.stop()
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"client exited with {p.exitcode}")
    stop.set()
    sampler.join()
    return n_clients * n_steps * VALUES_PER_STEP / (max(ends) - t0), peak[0]


def raw_insert(database_url: str, n_clients: int, n_steps: int, batch_size: int) -> float:
    """The same rows into the same table through the same driver: executemany, one commit per batch."""
    from gradwatch.wire import pack_floats
    from gradwatch_service.storage.db import make_engine
    from gradwatch_service.storage.dialect import COPY_TYPES, STEP_COLUMNS, storage_dialect
    from gradwatch_service.storage.migrate import upgrade

    engine = make_engine(database_url)
    upgrade(engine)
    sqlite = engine.dialect.name == "sqlite"
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO projects (name) VALUES ('raw')")
        for k in range(n_clients):
            conn.exec_driver_sql(
                "INSERT INTO runs (run_id, project_id, status, layer_names, n_steps, created_at, updated_at) "
                f"VALUES ('raw-{k}', 1, 'running', '[]', 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)")
    run_pks = [r[0] for r in engine.connect().exec_driver_sql("SELECT id FROM runs ORDER BY id").all()]
    assert len(STEP_COLUMNS) == 12
    work = []
    for k in range(n_clients):
        for b in batches(make_steps(n_steps, k), batch_size):
            work.append([(run_pks[k], s["step"], s["time"], s["loss"], s["grad_norm"], s["lr"], s["update_norm"], 0,
                          s["layer_grad_norms"], None, None, None) for s in b])
    sql = storage_dialect(engine).insert_steps_sql()
    raw = engine.raw_connection()
    driver = raw.driver_connection
    t0 = time.perf_counter()
    for rows in work:  # the driver's own work: pack the arrays as the service does, insert, commit
        if sqlite:
            rows = [r[:8] + (pack_floats(r[8]),) + r[9:] for r in rows]
            driver.execute("BEGIN IMMEDIATE")
            driver.executemany(sql, rows)
            driver.execute("COMMIT")
        else:  # the fastest way in through psycopg, and the one the service uses: binary COPY
            with driver.cursor().copy(f"COPY steps ({', '.join(STEP_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(list(COPY_TYPES))
                for r in rows:
                    cp.write_row(r)
            driver.commit()
    elapsed = time.perf_counter() - t0
    raw.close()
    engine.dispose()
    return n_clients * n_steps * VALUES_PER_STEP / elapsed


ALERTING_ENV = {"on": {"GRADWATCH_METRICS": "true", "GRADWATCH_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true"},
                "off": {"GRADWATCH_METRICS": "false"}}


def measure(backend: str, n_clients: int, n_steps: int, batch_size: int, workdir: Path, workers: int = 1,
            env: dict[str, str] | None = None, raw: bool = True, use_gzip: bool = True,
            wires: tuple[str, ...] = ("binary",), alerting: str | None = None) -> dict[str, float]:
    """End-to-end (and, with raw, the raw insert rate) on a fresh database; env goes to the service. The first
    wire's figures are `values_per_s`..., the others' `json_values_per_s`... (each its own fresh database).
    `alerting`: "on" (metrics on, a webhook subscription, /metrics scraped every second), "off" (metrics off, no
    subscription) or None (the service's defaults, nothing subscribed or scraped)."""
    out: dict[str, float] = {"scrapes": 0, "webhooks": 0}
    rss = 0.0
    for wire in wires:
        with fresh_database(backend, workdir) as url:
            server = BenchServer(url, log_path=workdir / f"server-{backend}.log", args=["--workers", str(workers)],
                                 env={**(env or {}), **ALERTING_ENV.get(alerting or "", {})})
            server.start()
            receiver = scraper = None
            try:
                if alerting == "on":
                    receiver, scraper = Receiver(), Scraper(server.url)
                    post_json(server.url + "/v1/webhooks", {"url": receiver.url, "name": "bench"})
                    urllib.request.urlopen(server.url + "/metrics", timeout=30).close()  # scraped before, as in use
                e2e, peak = end_to_end(server.url, n_clients, n_steps, batch_size, server, use_gzip, wire,
                                       scraper=scraper)
            finally:
                server.stop()
                if receiver is not None:
                    receiver.close()
        out[f"{'' if wire == wires[0] else wire + '_'}values_per_s"] = e2e
        out["scrapes"] += scraper.scrapes if scraper else 0
        out["webhooks"] += receiver.received if receiver else 0
        rss = max(rss, peak)
    out["service_rss_mb"] = rss
    if not raw:
        return out
    with fresh_database(backend, workdir) as url:
        raw_rate = raw_insert(url, n_clients, n_steps, batch_size)
    out["raw_values_per_s"] = raw_rate
    for wire in wires:
        key = "" if wire == wires[0] else wire + "_"
        out[f"{key}ratio_to_raw"] = out[f"{key}values_per_s"] / raw_rate
    return out


def alerting_pairs(backend: str, args: argparse.Namespace, n_steps: int, workdir: Path, wire: str,
                   env: dict[str, str]) -> dict[str, Any]:
    """Back-to-back pairs, alerting off and on, in alternating order so drift and noise hit both sides: the
    median of each side and the median of the pairs' ratios."""
    rates: dict[str, list[float]] = {"on": [], "off": []}
    ratios, scrapes, webhooks = [], 0.0, 0.0
    for i in range(args.pairs):
        rate = {}
        for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
            m = measure(backend, args.clients, n_steps, args.batch, workdir, args.workers, env=env, raw=False,
                        use_gzip=not args.no_gzip, wires=(wire,), alerting=mode)
            rate[mode] = m["values_per_s"]
            rates[mode].append(m["values_per_s"])
            scrapes, webhooks = scrapes + m["scrapes"], webhooks + m["webhooks"]
        ratios.append(rate["on"] / rate["off"])
    return {"off": statistics.median(rates["off"]), "on": statistics.median(rates["on"]),
            "ratio": statistics.median(ratios), "ratios": ratios, "scrapes": scrapes, "webhooks": webhooks}


def overlay_of(checkout: Path, workdir: Path) -> Path:
    """A folder whose `gradwatch` and `gradwatch_service` are the checkout's (its migrations inside, as the
    wheel ships them): first on a server's PYTHONPATH, it runs that checkout's code in this virtualenv."""
    out = workdir / f"overlay-{checkout.name}"
    if out.exists():
        return out
    (out / "gradwatch_service").mkdir(parents=True)
    (out / "gradwatch").symlink_to(checkout / "client" / "gradwatch")
    for entry in (checkout / "service" / "gradwatch_service").iterdir():
        if entry.name not in ("__pycache__", "migrations"):
            (out / "gradwatch_service" / entry.name).symlink_to(entry)
    (out / "gradwatch_service" / "migrations").symlink_to(checkout / "migrations")
    return out


def rollups_settled(url: str) -> Any:
    """True once no run's stored steps go beyond its rollups (this tree's own check)."""
    from gradwatch_service.storage.db import make_engine, read_connection
    from gradwatch_service.storage.rollups import lagging_runs

    engine = make_engine(url)

    def settled() -> bool:
        with read_connection(engine) as conn:
            return not lagging_runs(conn)

    return settled


def against_pairs(backend: str, args: argparse.Namespace, n_steps: int, workdir: Path,
                  env: dict[str, str]) -> dict[str, Any]:
    """Back-to-back pairs of this tree and the checkout at `args.against`, in alternating order."""
    other = overlay_of(Path(args.against).resolve(), workdir)
    rates: dict[str, list[float]] = {"this": [], "other": []}
    cpu: dict[str, list[float]] = {"this": [], "other": []}
    ratios, settled = [], []
    for i in range(args.pairs):
        rate = {}
        for side in ("this", "other") if i % 2 == 0 else ("other", "this"):
            side_env = dict(env, GRADWATCH_METRICS="false")
            if side == "other":
                side_env["PYTHONPATH"] = str(other)
            with fresh_database(backend, workdir) as url:
                server = BenchServer(url, log_path=workdir / f"server-{backend}-{side}.log",
                                     args=["--workers", str(args.workers)], env=side_env)
                server.start()
                try:
                    started = cpu_s(server.pid)
                    rate[side], _ = end_to_end(server.url, args.clients, n_steps, args.batch, server,
                                               prefix=f"{side}{i}",
                                               settled=rollups_settled(url) if side == "this" else None)
                    cpu[side].append((cpu_s(server.pid) - started) / (args.clients * n_steps) * 1e6)
                finally:
                    server.stop()
            if side == "this":
                settled.append(server.settled_s)  # type: ignore[attr-defined]
            rates[side].append(rate[side])
        ratios.append(rate["this"] / rate["other"])
    return {"this": statistics.median(rates["this"]), "other": statistics.median(rates["other"]),
            "ratio": statistics.median(ratios), "ratios": ratios, "rates": rates,
            "settled_ms": statistics.median(settled) * 1000,
            "cpu_us": {side: statistics.median(v) for side, v in cpu.items()},
            "cpu_ratio": statistics.median([a / b if b else math.inf  # a run shorter than a clock tick
                                            for a, b in zip(cpu["this"], cpu["other"], strict=True)])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run for CI")
    ap.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    ap.add_argument("--steps", type=int, help="steps per client (default 25000, quick 2000)")
    ap.add_argument("--batch", type=int, default=1000, help="steps per batch")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--wire", choices=("binary", "json", "both"), default="binary",
                    help="how batches travel: binary columns (the client's default), gzip'd JSON, or both side by "
                         "side (the JSON figures then have a json_ prefix)")
    ap.add_argument("--no-gzip", action="store_true", help="with JSON, send it plain (the client gzips JSON)")
    ap.add_argument("--detection", choices=("on", "off"), default="on",
                    help="run the explosion detectors on ingest (the service's default: on)")
    ap.add_argument("--alerting", choices=("on", "off", "both"), default="off",
                    help="on: metrics on, a webhook subscription, /metrics scraped every second; off (default): "
                         "GRADWATCH_METRICS=false, no subscription; both: the main figures with it off, plus "
                         "pairs of off and on runs and their ratio")
    ap.add_argument("--pairs", type=int,
                    help="with --alerting both or --against: pairs per database (default 5, quick 1)")
    ap.add_argument("--workers", type=int, default=1, help="service worker processes")
    ap.add_argument("--against", metavar="PATH", help="another checkout of gradwatch: pairs of this tree and it, "
                                                      "alternating, instead of the usual figures")
    args = ap.parse_args()
    n_steps = args.steps or (2000 if args.quick else 25000)
    args.pairs = args.pairs or (1 if args.quick else 5)
    figures: dict[str, Any] = {}
    rss = 0.0
    env = {"GRADWATCH_DETECTION": "true" if args.detection == "on" else "false"}
    on_vs_off: list[float] = []
    if args.against:
        return compare(args, n_steps, env)
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as tmp:
        for backend in args.backends.split(","):
            wires = ("binary", "json") if args.wire == "both" else (args.wire,)
            m = measure(backend, args.clients, n_steps, args.batch, Path(tmp), args.workers, env=env,
                        use_gzip=not args.no_gzip, wires=wires, alerting="on" if args.alerting == "on" else "off")
            name = "postgres" if backend.startswith("postgres") else "sqlite"
            figures[f"{name}_values_per_s"] = round(m["values_per_s"])
            figures[f"{name}_raw_values_per_s"] = round(m["raw_values_per_s"])
            figures[f"{name}_ratio_to_raw"] = round(m["ratio_to_raw"], 3)
            if "json_values_per_s" in m:
                figures[f"{name}_json_values_per_s"] = round(m["json_values_per_s"])
                figures[f"{name}_json_ratio_to_raw"] = round(m["json_ratio_to_raw"], 3)
            rss = max(rss, m["service_rss_mb"])
            pairs = None
            if args.alerting == "both":
                pairs = alerting_pairs(backend, args, n_steps, Path(tmp), wires[0], env)
                on_vs_off.append(pairs["ratio"])
                figures[f"{name}_alerting_off_values_per_s"] = round(pairs["off"])
                figures[f"{name}_alerting_on_values_per_s"] = round(pairs["on"])
                figures[f"{name}_ingest_alerting_on_vs_off"] = round(pairs["ratio"], 3)
                figures[f"{name}_ingest_alerting_on_vs_off_pairs"] = [round(r, 3) for r in pairs["ratios"]]
                figures[f"{name}_alerting_scrapes"] = int(pairs["scrapes"])
                figures[f"{name}_alerting_webhooks"] = int(pairs["webhooks"])
            if not args.json:
                rows: list[tuple[str, Any]] = [(f"end-to-end values/s, {wires[0]}", m["values_per_s"])]
                if "json_values_per_s" in m:
                    rows.append(("end-to-end values/s, json", m["json_values_per_s"]))
                rows += [("raw insert values/s", m["raw_values_per_s"]),
                         (f"end-to-end / raw, {wires[0]}", f"{m['ratio_to_raw']:.2f}")]
                if "json_values_per_s" in m:
                    rows.append(("end-to-end / raw, json", f"{m['json_ratio_to_raw']:.2f}"))
                rows.append(("service peak RSS MB", m["service_rss_mb"]))
                if args.alerting == "on":
                    rows += [("/metrics scrapes (1 s apart)", int(m["scrapes"])),
                             ("webhooks received", int(m["webhooks"]))]
                print_table(f"ingest, {name}: {args.clients} clients x {n_steps} steps x {VALUES_PER_STEP} values, "
                            f"batches of {args.batch}, {args.workers} service worker(s), detection {args.detection}, "
                            f"alerting {'on' if args.alerting == 'on' else 'off'}", rows)
                if pairs is not None:
                    print_side_by_side(name, args.pairs, wires[0], pairs)
    if on_vs_off:  # the worse database: the target (within 10 %) must hold on each
        figures["ingest_alerting_on_vs_off"] = round(min(on_vs_off), 3)
    figures["service_rss_mb"] = round(rss, 1)
    emit(figures, args.json)
    return 0


def compare(args: argparse.Namespace, n_steps: int, env: dict[str, str]) -> int:
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as tmp:
        for backend in args.backends.split(","):
            name = "postgres" if backend.startswith("postgres") else "sqlite"
            pairs = against_pairs(backend, args, n_steps, Path(tmp), env)
            figures[f"{name}_values_per_s"] = round(pairs["this"])
            figures[f"{name}_against_values_per_s"] = round(pairs["other"])
            figures[f"{name}_ratio_to_against"] = round(pairs["ratio"], 3)
            figures[f"{name}_ratio_to_against_pairs"] = [round(r, 3) for r in pairs["ratios"]]
            figures[f"{name}_rollups_settled_ms"] = round(pairs["settled_ms"], 1)
            figures[f"{name}_cpu_us_per_step"] = round(pairs["cpu_us"]["this"], 2)
            figures[f"{name}_against_cpu_us_per_step"] = round(pairs["cpu_us"]["other"], 2)
            figures[f"{name}_cpu_ratio_to_against"] = round(pairs["cpu_ratio"], 3)
            if not args.json:
                title = (f"ingest, {name}: this tree against {args.against}, {args.pairs} back-to-back pair(s) "
                         f"in alternating order; {args.clients} clients x {n_steps} steps x {VALUES_PER_STEP} "
                         f"values, batches of {args.batch}, detection {args.detection}, metrics off")
                print(title)
                print("-" * len(title))
                print(f"{'':<14}{'this tree':>16}{'against':>16}{'this / against':>16}")
                print(f"{'values/s':<14}{pairs['this']:>16,.0f}{pairs['other']:>16,.0f}{pairs['ratio']:>16.3f}")
                print(f"{'CPU µs/step':<14}{pairs['cpu_us']['this']:>16.2f}{pairs['cpu_us']['other']:>16.2f}"
                      f"{pairs['cpu_ratio']:>16.3f}")
                ratios = pairs["ratios"]
                print(f"pairs' ratios: {', '.join(f'{r:.3f}' for r in ratios)} (min {min(ratios):.3f}, "
                      f"max {max(ratios):.3f})")
                print(f"values/s, this tree: {', '.join(f'{r:,.0f}' for r in pairs['rates']['this'])}")
                print(f"values/s, against:   {', '.join(f'{r:,.0f}' for r in pairs['rates']['other'])}")
                print(f"rollups held every step {pairs['settled_ms']:.0f} ms after the last acknowledgement "
                      "(median, this tree)")
                print()
    emit(figures, args.json)
    return 0


def print_side_by_side(name: str, n_pairs: int, wire: str, pairs: dict[str, Any]) -> None:
    title = (f"ingest with alerting off and on, {name}, {wire}: median of {n_pairs} back-to-back pair(s); on = "
             f"metrics on, 1 webhook subscription, /metrics scraped every 1 s")
    print(title)
    print("-" * len(title))
    print(f"{'':<14}{'alerting off':>16}{'alerting on':>16}{'on / off':>12}")
    print(f"{'values/s':<14}{pairs['off']:>16,.0f}{pairs['on']:>16,.0f}{pairs['ratio']:>12.3f}")
    print(f"pairs' on/off: {', '.join(f'{r:.3f}' for r in pairs['ratios'])}; during the on runs "
          f"{int(pairs['scrapes'])} scrapes, {int(pairs['webhooks'])} webhooks received (healthy steps: incidents are "
          f"rare; a webhook's cost per incident is bench/alert_latency.py's)")
    print()


if __name__ == "__main__":
    raise SystemExit(main())
