"""The Prometheus path end to end, with real parts only: a gradwatch server, the `prometheus` binary running the
shipped rules (deploy/prometheus/rules.yml) and scraping every second, `prometheus-alertmanager`, and a webhook
receiver on 127.0.0.1. A run goes NaN: the alert fires in Prometheus and reaches the receiver; the run finishes:
the alert resolves in both."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from .support.databases import new_run_id
from .support.prometheus import REPO, alertmanager_server, get_json, prometheus_server
from .support.serverproc import ServerProcess

T = TypeVar("T")
ALERT = "GradwatchNonFiniteValues"


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 45.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Receiver:
    """Records the JSON bodies Alertmanager posts to its webhook receiver."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/alerts"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def notification(self, status: str, run_id: str) -> dict[str, Any] | None:
        for body in list(self.bodies):
            if body["status"] == status and any(a["labels"].get("run") == run_id for a in body["alerts"]):
                return body
        return None

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[ServerProcess, str, Receiver]]:
    """gradwatch → Prometheus (1 s scrape and evaluation, the shipped rules) → Alertmanager → receiver."""
    receiver = Receiver()
    gradwatch = ServerProcess(f"sqlite:///{tmp_path / 'gw.db'}", log_path=tmp_path / "gradwatch.log")
    am_config = tmp_path / "alertmanager.yml"
    am_config.write_text(json.dumps({
        "route": {"receiver": "test", "group_by": ["alertname", "project", "run"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "test", "webhook_configs": [{"url": receiver.url, "send_resolved": True}]}],
    }))
    alertmanager = alertmanager_server(am_config, tmp_path)
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO / "deploy" / "prometheus" / "rules.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager.port}"]}]}]},
        "scrape_configs": [{"job_name": "gradwatch", "static_configs": [{"targets": [f"127.0.0.1:{gradwatch.port}"]}]}],
    }))
    prometheus = prometheus_server(prom_config, tmp_path)
    started: list[Any] = []
    try:
        for part in (gradwatch, alertmanager, prometheus):
            part.start()
            started.append(part)
        yield gradwatch, prometheus.url, receiver
    finally:
        for part in reversed(started):
            part.stop()
        receiver.close()


@pytest.mark.slow
def test_a_nan_run_fires_in_prometheus_and_reaches_the_receiver_and_finishing_it_resolves(
        stack: tuple[ServerProcess, str, Receiver]) -> None:
    gradwatch, prometheus, receiver = stack
    run_id = new_run_id("e2e")

    def prometheus_alert() -> dict[str, Any] | None:
        alerts = get_json(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
        return next((a for a in alerts if a["labels"]["alertname"] == ALERT and a["labels"].get("run") == run_id),
                    None)

    with httpx.Client(base_url=gradwatch.url, timeout=30) as http:
        assert http.put(f"/v1/runs/{run_id}", json={"project": "e2e", "layers": ["fc1", "fc2"]}).status_code == 201
        healthy = [{"step": i, "loss": 2.0, "grad_norm": 1.0, "layer_grad_norms": [0.7, 0.7]} for i in range(50)]
        assert http.post(f"/v1/runs/{run_id}/steps", json={"steps": healthy}).status_code == 200
        wait_for("the healthy run to be scraped", lambda: get_json(
            f"{prometheus}/api/v1/query?query=gradwatch_run_running{{run=%22{run_id}%22}}")["data"]["result"])
        assert prometheus_alert() is None

        # NaN out of the blue (a climb first would open the episode under grad_growth or loss_divergence, and its
        # NaN would page no second time: deploy/prometheus/tests/runs.yml, run r7)
        exploding = [{"step": 50, "loss": 2.0, "grad_norm": 1.0, "layer_grad_norms": [0.7, 0.7]},
                     {"step": 51, "loss": "NaN", "grad_norm": "Infinity", "layer_grad_norms": [0.7, "NaN"]}]
        assert http.post(f"/v1/runs/{run_id}/steps", json={"steps": exploding}).status_code == 200

        firing = wait_for("the alert to fire in Prometheus",
                          lambda: (a := prometheus_alert()) and a["state"] == "firing" and a)
        assert firing["labels"] == {"alertname": ALERT, "project": "e2e", "run": run_id, "severity": "critical"}
        assert firing["annotations"]["runbook_url"] == "docs/runbook.md#gradwatchnonfinitevalues"
        note = wait_for("Alertmanager to notify the receiver", lambda: receiver.notification("firing", run_id))
        assert note["commonLabels"]["alertname"] == ALERT

        assert http.put(f"/v1/runs/{run_id}", json={"status": "finished"}).status_code == 200
    wait_for("the alert to resolve in Prometheus", lambda: prometheus_alert() is None)
    wait_for("the receiver to hear it resolved", lambda: receiver.notification("resolved", run_id))
