"""Alert latency: from sending the ingest request that carries a run's first NaN to the webhook arriving.

A real `gradwatch serve` (default settings, loopback targets allowed) on SQLite and on PostgreSQL, one
subscription, a receiver on 127.0.0.1 in this process (so both ends read one clock). Each run gets a few
healthy steps, then the clock starts and one batch with a NaN grad norm goes in; the clock stops when the
receiver has read the `firing` webhook for that run. Runs follow one another, so this is latency, not load.

Then the other path: the `prometheus` binary with the shipped deploy/prometheus/prometheus.yml (its scrape and
evaluation intervals, rules.yml as it is; only the scrape target is this benchmark's server) and the time from
sending a run's first NaN until `/api/v1/alerts` shows GradwatchNonFiniteValues firing for it (`--prometheus-runs`,
default 3; each NaN is sent at a random point of the scrape interval). Without the binary that figure is null
and `prometheus_reason` says why.
Run: `python bench/alert_latency.py [--runs 200] [--prometheus-runs 3] [--quick] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BenchServer,
    PrometheusServer,
    Receiver,
    duration_s,
    emit,
    fresh_database,
    get_json,
    metrics_token_file,
    percentile,
    print_table,
    prometheus_rule,
    shipped_prometheus_config,
)

HEALTHY_STEPS = 5
ALERT = "GradwatchNonFiniteValues"  # deploy/prometheus/rules.yml: NaN or Infinity in a running run


class Arrivals:
    """The receiver: when each run's webhook arrived (perf_counter), keyed by the run label."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.cond = threading.Condition()
        self.receiver = Receiver(self._arrived)
        self.url = self.receiver.url

    def _arrived(self, body: bytes, at: float) -> None:
        run = json.loads(body)["alerts"][0]["labels"]["run"]
        with self.cond:
            self.at.setdefault(run, at)
            self.cond.notify_all()

    def wait(self, run: str, timeout: float = 30.0) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: run in self.at, timeout):
                raise TimeoutError(f"no webhook for {run} within {timeout}s")
            return self.at[run]


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
    return {"webhook_p50_ms": statistics.median(latencies), "webhook_p99_ms": percentile(latencies, 0.99),
            "webhook_max_ms": max(latencies), "ingest_ack_p50_ms": statistics.median(acks),
            "ingest_ack_p99_ms": percentile(acks, 0.99), "after_ack_p99_ms": percentile(after_ack, 0.99),
            "after_ack_p50_ms": statistics.median(after_ack), "runs": n_runs,
            "_samples": latencies}  # type: ignore[dict-item]


def prometheus_firing(backend: str, n_runs: int, workdir: Path) -> dict[str, Any]:
    """NaN sent -> ALERT firing in Prometheus' /api/v1/alerts, with the shipped scrape, evaluation and rule
    settings: median and max over `n_runs` runs, each NaN sent at a random point of the scrape interval."""
    import httpx

    rule, group_interval = prometheus_rule(ALERT)
    figures: dict[str, Any] = {"prometheus_firing_s": None, "prometheus_firing_max_s": None,
                               "prometheus_firing_runs": 0}
    reason = PrometheusServer.missing() or (None if n_runs > 0 else "not measured (--prometheus-runs 0)")
    if reason:
        return {**figures, "prometheus_reason": reason}
    workdir = workdir / "prometheus"
    workdir.mkdir()
    with fresh_database(backend, workdir) as url:
        token_file = metrics_token_file(workdir)
        server = BenchServer(url, log_path=workdir / "server.log",
                             env={"GRADWATCH_METRICS_TOKEN_FILE": str(token_file)})
        server.start()
        prometheus = None
        try:
            config_path, config = shipped_prometheus_config(f"127.0.0.1:{server.port}", workdir, token_file)
            job = next(j for j in config["scrape_configs"] if j["job_name"] == "gradwatch")
            scrape_s = duration_s(job.get("scrape_interval") or config.get("global", {}).get("scrape_interval", "1m"))
            eval_s = duration_s(group_interval or config.get("global", {}).get("evaluation_interval", "1m"))
            for_s = duration_s(rule.get("for", "0s"))
            figures.update(prometheus_scrape_interval_s=scrape_s, prometheus_evaluation_interval_s=eval_s,
                           prometheus_rule_for_s=for_s)
            prometheus = PrometheusServer(config_path, workdir).start()
            api = prometheus.url + "/api/v1"
            runs = [f"prometheus-{i}" for i in range(n_runs)]
            with httpx.Client(base_url=server.url, timeout=30) as http:
                for run in runs:  # running and scraped healthy first, as a run that goes NaN mid-training is
                    http.put(f"/v1/runs/{run}", json={"project": "bench", "layers": ["a", "b"]}).raise_for_status()
                    steps = [{"step": s, "loss": 2.0, "grad_norm": 1.0, "layer_grad_norms": [0.5, 0.5]}
                             for s in range(HEALTHY_STEPS)]
                    http.post(f"/v1/runs/{run}/steps", json={"steps": steps}).raise_for_status()
                _until(lambda: len(get_json(f"{api}/query?query=gradwatch_run_running%3D%3D1")["data"]["result"])
                       == n_runs, timeout=3 * scrape_s + 30, what="Prometheus to scrape the healthy runs")
                took = []
                for run in runs:
                    time.sleep(random.uniform(0, scrape_s))  # NaNs land anywhere in the scrape interval
                    bad = {"step": HEALTHY_STEPS, "loss": 2.0, "grad_norm": "NaN", "layer_grad_norms": [0.5, 0.5]}
                    t0 = time.perf_counter()
                    http.post(f"/v1/runs/{run}/steps", json={"steps": [bad]}).raise_for_status()
                    _until(lambda: any(a["labels"].get("alertname") == ALERT and a["labels"].get("run") == run  # noqa: B023
                                       and a["state"] == "firing"
                                       for a in get_json(f"{api}/alerts")["data"]["alerts"]),
                           timeout=3 * (scrape_s + eval_s) + for_s + 30, what=f"{ALERT} to fire for {run}", poll=0.05)
                    took.append(time.perf_counter() - t0)
        finally:
            if prometheus is not None:
                prometheus.stop()
            server.stop()
    figures.update(prometheus_firing_s=round(statistics.median(took), 2), prometheus_firing_max_s=round(max(took), 2),
                   prometheus_firing_runs=n_runs)
    return figures


def _until(probe: Any, timeout: float, what: str, poll: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="runs per database (default 200)")
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--prometheus-runs", type=int, default=3,
                    help="NaN runs timed until Prometheus fires, shipped settings (default 3; quick 1; 0: skip)")
    ap.add_argument("--quick", action="store_true", help="20 runs per database and 1 for Prometheus, for CI")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    n_runs = 20 if args.quick else args.runs
    n_prometheus = min(1, args.prometheus_runs) if args.quick else args.prometheus_runs
    arrivals = Arrivals()
    figures: dict[str, Any] = {}
    pooled: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            out = measure(backend, n_runs, Path(tmp), arrivals)
            pooled += out.pop("_samples")
            figures.update({f"{backend}_{k}": round(v, 2) if isinstance(v, float) else v for k, v in out.items()})
        figures["webhook_p50_ms"] = round(statistics.median(pooled), 2)
        figures["webhook_p99_ms"] = round(percentile(pooled, 0.99), 2)
        if not args.json:
            print_table(f"NaN ingest request sent -> webhook received, {n_runs} runs per database (ms)",
                        [(k, v) for k, v in figures.items()])
        prometheus = prometheus_firing(args.backends.split(",")[0], n_prometheus, Path(tmp))
    figures.update(prometheus)
    if not args.json:
        print_prometheus(prometheus)
    emit(figures, args.json)


def print_prometheus(p: dict[str, Any]) -> None:
    if p["prometheus_firing_s"] is None:
        print_table(f"NaN ingest request sent -> {ALERT} firing in Prometheus",
                    [("not measured", p["prometheus_reason"])])
        return
    scrape, evaluation, rule_for = (p[f"prometheus_{k}"] for k in ("scrape_interval_s", "evaluation_interval_s",
                                                                    "rule_for_s"))
    print_table(f"NaN ingest request sent -> {ALERT} firing in Prometheus, shipped settings, "
                f"{p['prometheus_firing_runs']} run(s) (s)", [
        ("median", p["prometheus_firing_s"]), ("max", p["prometheus_firing_max_s"]),
        ("scrape_interval (prometheus.yml)", scrape), ("evaluation_interval (prometheus.yml)", evaluation),
        (f"for: of {ALERT} (rules.yml)", rule_for),
        ("bound: scrape + evaluation + for + 1 s cache", scrape + evaluation + rule_for + 1.0),
        ("traded off by", "scrape_interval, evaluation_interval, the rule's for:"),
    ])


if __name__ == "__main__":
    main()
