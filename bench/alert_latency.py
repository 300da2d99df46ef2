"""Alert latency: from sending the ingest request that carries a run's first NaN to the webhook arriving.

A real `gradwatch serve` (default settings, loopback targets allowed) on SQLite and on PostgreSQL, one
subscription, a receiver on 127.0.0.1 in this process (so both ends read one clock). Each run gets a few
healthy steps, then the clock starts and one batch with a NaN grad norm goes in; the clock stops when the
receiver has read the `firing` webhook for that run. Runs follow one another, so this is latency, not load.
Run: `python bench/alert_latency.py [--runs 200] [--quick] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchServer, emit, fresh_database, print_table  # noqa: E402

HEALTHY_STEPS = 5


class Arrivals:
    """The receiver: when each run's webhook arrived (perf_counter), keyed by the run label."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.cond = threading.Condition()
        arrivals = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                now = time.perf_counter()
                self.send_response(204)
                self.end_headers()
                run = json.loads(body)["alerts"][0]["labels"]["run"]
                with arrivals.cond:
                    arrivals.at.setdefault(run, now)
                    arrivals.cond.notify_all()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait(self, run: str, timeout: float = 30.0) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: run in self.at, timeout):
                raise TimeoutError(f"no webhook for {run} within {timeout}s")
            return self.at[run]


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def measure(backend: str, n_runs: int, workdir: Path, arrivals: Arrivals) -> dict[str, float]:
    import httpx

    latencies, acks, after_ack = [], [], []
    with fresh_database(backend, workdir) as url:
        server = BenchServer(url, env={"GRADWATCH_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true"},
                             log_path=workdir / f"server-{backend}.log")
        server.start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                assert http.post("/v1/webhooks", json={"url": arrivals.url}).status_code == 201
                for i in range(n_runs):
                    run = f"{backend}-{i}"
                    http.put(f"/v1/runs/{run}", json={"project": "bench", "layers": ["a", "b"]}).raise_for_status()
                    steps = [{"step": s, "loss": 2.0, "grad_norm": 1.0, "layer_grad_norms": [0.5, 0.5]}
                             for s in range(HEALTHY_STEPS)]
                    http.post(f"/v1/runs/{run}/steps", json={"steps": steps}).raise_for_status()
                    bad = {"step": HEALTHY_STEPS, "loss": 2.0, "grad_norm": "NaN", "layer_grad_norms": [0.5, 0.5]}
                    t0 = time.perf_counter()
                    r = http.post(f"/v1/runs/{run}/steps", json={"steps": [bad]})
                    t_ack = time.perf_counter()
                    assert r.json()["open_incidents"], r.text
                    arrived = arrivals.wait(run)
                    acks.append((t_ack - t0) * 1000)
                    latencies.append((arrived - t0) * 1000)
                    after_ack.append((arrived - t_ack) * 1000)
        finally:
            server.stop()
    return {"webhook_p50_ms": statistics.median(latencies), "webhook_p99_ms": _pct(latencies, 99),
            "webhook_max_ms": max(latencies), "ingest_ack_p50_ms": statistics.median(acks),
            "ingest_ack_p99_ms": _pct(acks, 99), "after_ack_p99_ms": _pct(after_ack, 99),
            "after_ack_p50_ms": statistics.median(after_ack), "runs": n_runs,
            "_samples": latencies}  # type: ignore[dict-item]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="runs per database (default 200)")
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--quick", action="store_true", help="20 runs per database, for CI")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    n_runs = 20 if args.quick else args.runs
    arrivals = Arrivals()
    figures: dict[str, Any] = {}
    pooled: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            out = measure(backend, n_runs, Path(tmp), arrivals)
            pooled += out.pop("_samples")
            figures.update({f"{backend}_{k}": round(v, 2) if isinstance(v, float) else v for k, v in out.items()})
    figures["webhook_p50_ms"] = round(statistics.median(pooled), 2)
    figures["webhook_p99_ms"] = round(_pct(pooled, 99), 2)
    if not args.json:
        print_table(f"NaN ingest request sent -> webhook received, {n_runs} runs per database (ms)",
                    [(k, v) for k, v in figures.items()])
    emit(figures, args.json)


if __name__ == "__main__":
    main()
