"""Webhooks end to end: a real service process posts to a real receiver on 127.0.0.1.

Retries keep one `webhook-id` and stop at the first 2xx; a crash between commit and delivery loses nothing;
a hanging receiver holds up neither ingest nor other receivers; two replicas on one PostgreSQL send each event
once. Retry delays, timeouts and the poll interval are settings, shortened here so every test ends in seconds.
"""

from __future__ import annotations

import math
import os
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from gradwatch import detect

from ..support.databases import PostgresSchema, new_run_id, require_postgres
from ..support.receiver import Receiver
from ..support.serverproc import ServerProcess, free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

FAST = {"GRADWATCH_WEBHOOK_ALLOWED_TARGETS": "127.0.0.1", "GRADWATCH_WEBHOOK_RETRY_BASE_S": "0.05",
        "GRADWATCH_WEBHOOK_RETRY_MAX_DELAY_S": "0.2", "GRADWATCH_WEBHOOK_POLL_S": "0.2",
        "GRADWATCH_WEBHOOK_TIMEOUT_S": "1"}


@contextmanager
def serving(database_url: str, tmp_path: Path, port: int | None = None, **env: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(database_url, port=port, env={**FAST, **env},
                         log_path=tmp_path / f"server-{time.monotonic_ns()}.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _subscribe(base_url: str, receiver: Receiver, **fields: Any) -> dict[str, Any]:
    r = httpx.post(f"{base_url}/v1/webhooks", json={"url": receiver.url, **fields})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _step(i: int, bad: bool = False) -> dict[str, Any]:
    g = 1.0 + 0.05 * math.sin(i)
    return {"step": i, "loss": 2.0, "grad_norm": "NaN" if bad else g, "lr": 0.01,
            "layer_grad_norms": [g / 2, g / 2], "layer_weight_norms": [3.0, 3.0]}


def _explode(base_url: str, healthy: int = 5) -> tuple[str, float]:
    """A new run whose last step's grad norm is NaN; returns the run and how long its ingest request took."""
    run_id = new_run_id()
    with httpx.Client(base_url=base_url, timeout=30) as http:
        assert http.put(f"/v1/runs/{run_id}", json={"project": "hooks", "layers": ["a", "b"]}).status_code == 201
        t0 = time.perf_counter()
        r = http.post(f"/v1/runs/{run_id}/steps", json={"steps": [_step(i, i == healthy) for i in range(healthy + 1)]})
        took = time.perf_counter() - t0
    assert r.status_code == 200 and r.json()["open_incidents"], r.text
    return run_id, took


def _fails_first(n_failures: int) -> Any:
    return lambda _req, n: 500 if n <= n_failures else 200


def test_a_failing_receiver_sees_one_webhook_id_until_it_accepts_then_resolved(database_url: str,
                                                                               tmp_path: Path) -> None:
    with Receiver(_fails_first(3)) as receiver, serving(database_url, tmp_path) as server:
        sub = _subscribe(server.url, receiver, name="oncall")
        run_id, _ = _explode(server.url)
        got = receiver.wait_for(lambda rs: any(r.status == 200 for r in rs))
        assert [r.status for r in got] == [500, 500, 500, 200]
        assert len({r.msg_id for r in got}) == 1
        timestamps = [int(r.headers["webhook-timestamp"]) for r in got]
        assert timestamps == sorted(timestamps)
        body = Webhook(sub["secret"]).verify(got[-1].body, got[-1].headers)  # the reference verifier
        assert body["version"] == "4" and body["status"] == "firing" and body["receiver"] == "oncall"
        (alert,) = body["alerts"]
        assert alert["labels"]["run"] == run_id and alert["labels"]["signature"] == "nonfinite"
        assert alert["labels"]["severity"] == "critical" and alert["endsAt"] == "0001-01-01T00:00:00Z"
        assert body["groupLabels"] == {"project": "hooks", "run": run_id} and body["truncatedAlerts"] == 0
        incident = body["gradwatch"]["incident"]
        assert incident["evidence"]["opened"]["values"]["grad_norm"] == "NaN"
        assert body["gradwatch"]["run_url"].endswith(f"/v1/runs/{run_id}")

        with httpx.Client(base_url=server.url, timeout=30) as http:  # quiet steps resolve it
            quiet = detect.DetectorConfig().resolve_after_steps
            steps = [_step(i) for i in range(6, 6 + quiet + 5)]
            assert http.post(f"/v1/runs/{run_id}/steps", json={"steps": steps}).status_code == 200
        got = receiver.wait_for(lambda rs: len(rs) == 5)
        resolved = got[-1].json()
        assert resolved["status"] == "resolved" and resolved["alerts"][0]["status"] == "resolved"
        assert resolved["alerts"][0]["fingerprint"] == alert["fingerprint"]
        assert resolved["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
        assert got[-1].msg_id != got[0].msg_id

        time.sleep(0.5)  # nothing more arrives: one accepted delivery per event
        assert len(receiver.received) == 5
        log = httpx.get(f"{server.url}/v1/webhooks/{sub['id']}/deliveries").json()
        assert log["count"] == 2
        firing = next(d for d in log["deliveries"] if d["event"] == "firing")
        assert firing["state"] == "delivered" and firing["msg_id"] == got[0].msg_id
        assert [(a["outcome"], a["status_code"]) for a in firing["attempts"]] == [("failed", 500)] * 3 + [
            ("delivered", 200)]
        assert all(a["latency_ms"] > 0 for a in firing["attempts"])


def test_a_dead_delivery_can_be_resent_with_the_same_webhook_id(tmp_path: Path) -> None:
    accepting = threading.Event()
    with Receiver(lambda _r, _n: 200 if accepting.is_set() else 503) as receiver, \
            serving(f"sqlite:///{tmp_path / 'dead.db'}", tmp_path, GRADWATCH_WEBHOOK_RETRY_FOR_S="0.5") as server:
        sub = _subscribe(server.url, receiver)
        _explode(server.url)
        log_url = f"{server.url}/v1/webhooks/{sub['id']}/deliveries"
        deadline = time.monotonic() + 15
        while not (dead := httpx.get(log_url, params={"state": "dead"}).json()["deliveries"]):
            assert time.monotonic() < deadline, "the delivery never died"
            time.sleep(0.1)
        (delivery,) = dead
        assert delivery["attempts"][-1]["outcome"] == "dead" and delivery["last_status_code"] == 503
        tries = len(receiver.received)
        assert tries == len(delivery["attempts"]) >= 2
        accepting.set()
        resent = httpx.post(f"{log_url}/{delivery['id']}/resend")
        assert resent.status_code == 200 and resent.json()["state"] == "pending", resent.text
        assert httpx.post(f"{log_url}/{delivery['id']}/resend").status_code in (200, 409)  # 409 until it is sent
        got = receiver.wait_for(lambda rs: len(rs) == tries + 1)
        assert {r.msg_id for r in got} == {delivery["msg_id"]} and got[-1].status == 200
        deadline = time.monotonic() + 5
        while httpx.get(log_url).json()["deliveries"][0]["state"] != "delivered":
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_sigkill_between_commit_and_delivery_loses_nothing(tmp_path: Path) -> None:
    """Killed with the webhook committed but not sent (worker off), then killed mid-POST: both arrive."""
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    release = threading.Event()
    hang_first = lambda _req, n: (release.wait(10), 200)[1] if n == 1 else 200  # noqa: E731
    with Receiver(hang_first) as receiver:
        with serving(url, tmp_path, GRADWATCH_WEBHOOK_DELIVERY="false") as server:
            port = server.port
            _subscribe(server.url, receiver)
            _explode(server.url)  # acknowledged: committed with its outbox row
            server.kill()
        assert receiver.received == []
        with serving(url, tmp_path, port=port) as server:
            first = receiver.wait_for(lambda rs: len(rs) == 1)[0]  # the POST is in flight ...
            server.kill()  # ... when the service dies
            release.set()
        with serving(url, tmp_path, port=port):
            got = receiver.wait_for(lambda rs: len(rs) == 2, timeout=15)  # after the lease runs out
        assert got[1].msg_id == first.msg_id and got[1].body == first.body and got[1].status == 200


def test_a_hanging_receiver_holds_up_neither_ingest_nor_other_receivers(tmp_path: Path) -> None:
    release = threading.Event()
    with Receiver(lambda _r, _n: (release.wait(10), 200)[1]) as hung, Receiver() as good, \
            serving(f"sqlite:///{tmp_path / 'hang.db'}", tmp_path) as server:
        _subscribe(server.url, hung)
        _subscribe(server.url, good)
        try:
            for k in range(1, 6):
                _, took = _explode(server.url)
                assert took < 1.0
                good.wait_for(lambda rs, k=k: len(rs) == k, timeout=2)  # not queued behind the hung one
            assert len(hung.received) >= 1
        finally:
            release.set()


@pytest.mark.postgres
def test_two_replicas_on_one_postgresql_send_each_event_once(tmp_path: Path) -> None:
    require_postgres()
    schema = PostgresSchema()
    slow = lambda _r, _n: (time.sleep(0.02), 200)[1]  # noqa: E731 - a little in flight, so claims overlap
    try:
        with Receiver(slow) as receiver, serving(schema.url, tmp_path) as a, serving(schema.url, tmp_path) as b:
            _subscribe(a.url, receiver)
            runs = [_explode(server.url)[0] for _ in range(10) for server in (a, b)]
            receiver.wait_for(lambda rs: len({r.msg_id for r in rs}) == len(runs), timeout=30)
            time.sleep(1.0)  # let any duplicate arrive
            per_id = Counter(r.msg_id for r in receiver.received)
            assert len(per_id) == len(runs) and set(per_id.values()) == {1}
            assert {r.json()["alerts"][0]["labels"]["run"] for r in receiver.received} == set(runs)
    finally:
        schema.drop()




def test_the_documented_stdlib_receiver_accepts_what_the_service_sends(tmp_path: Path) -> None:
    port = free_port()
    with serving(f"sqlite:///{tmp_path / 'example.db'}", tmp_path) as server:
        r = httpx.post(f"{server.url}/v1/webhooks", json={"url": f"http://127.0.0.1:{port}/"})
        env = {**os.environ, "WEBHOOK_SECRET": r.json()["secret"], "PORT": str(port)}
        receiver = subprocess.Popen([sys.executable, str(EXAMPLES / "webhook_receiver.py")], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            run_id, _ = _explode(server.url)
            assert receiver.stdout is not None
            ready, _, _ = select.select([receiver.stdout], [], [], 20)  # the service retries until it listens
            assert ready, "the example receiver printed nothing within 20 s"
            line = receiver.stdout.readline()
        finally:
            receiver.kill()
            receiver.wait(10)
            receiver.stdout.close()  # type: ignore[union-attr]
    status, run, signature, msg_id = line.split()
    assert (status, run, signature) == ("firing", run_id, "nonfinite") and msg_id.startswith("msg_")


def test_one_explosion_is_one_incident_paged_on_opening_escalation_and_resolution(database_url: str,
                                                                                  tmp_path: Path) -> None:
    """Tried as a new user would: `examples/train_tiny.py --explode` (real torch training) against a live server
    with a webhook subscribed. Its explosion shows four signatures or more (grad growth, the update ratio, the
    loss running away, NaN); they are one incident, with a timeline of its signatures, paged when it opens, when
    it turns critical and when it resolves: the run finished with it open, and that closes it."""
    pytest.importorskip("torch")
    project = new_run_id("demo")
    with Receiver() as receiver, serving(database_url, tmp_path) as server:
        _subscribe(server.url, receiver)
        subprocess.run([sys.executable, str(EXAMPLES / "train_tiny.py"), "--explode", "--quiet", "--steps", "300",
                        "--project", project, "--url", server.url], check=True, timeout=300, capture_output=True)
        (incident,) = httpx.get(f"{server.url}/v1/incidents", params={"project": project}).json()["incidents"]
        pages = receiver.wait_for(lambda got: any(r.json()["status"] == "resolved" for r in got))
        time.sleep(1.0)  # nothing more may follow
        pages = receiver.accepted()
    assert (incident["severity"], incident["status"]) == ("critical", "resolved")
    assert incident["evidence"]["resolved"]["reason"] == "run finished"
    timeline = incident["evidence"]["timeline"]
    assert {"grad_growth", "loss_divergence", "nonfinite"} <= {e["signature"] for e in timeline}
    assert [e["step"] for e in timeline] == sorted(e["step"] for e in timeline)
    assert incident["opened_step"] == timeline[0]["step"]
    # opening (+ one escalation when it opened as a warning) + resolution, all of this one incident
    statuses = [(r.json()["status"], r.json()["alerts"][0]["labels"]["severity"]) for r in pages]
    opened_as = timeline[0]["severity"]
    assert statuses == ([("firing", "warning")] if opened_as == "warning" else []) + [
        ("firing", "critical"), ("resolved", "critical")], statuses
