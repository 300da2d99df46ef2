"""The abuse suite (issue 22): what an attacker with valid tokens tried against a live server, replayed on SQLite
and PostgreSQL, with the bound that now holds each case.

Every response and request has a bound a setting names (limits.py, read_bounds.py): over it a 4xx naming the
setting. Each case of the report's findings 1 and 2 is replayed at its full size against a server with the
default limits, while a separate process polls `/healthz` and samples the server's RSS: the server's peak RSS
(its VmHWM, from /proc) stays within 300 MB and `/healthz` answers within 100 ms throughout. The server runs
without detection (`GRADWATCH_DETECTION=false`) only so that building a 10,000-layer run takes seconds.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from gradwatch.wire import BINARY_CONTENT_TYPE, BINARY_MAGIC
from gradwatch_service.alerting.webhook_targets import TargetPolicy, TargetRefused, address_problem, check_target

from ..support.databases import BACKENDS, new_database_url, new_run_id
from ..support.receiver import Receiver
from ..support.serverproc import ServerProcess, end_process, free_port

PEAK_RSS_MB = 300.0
HEALTHZ_S = 0.100
BIG_LAYERS, BIG_STEPS = 10_000, 1_200
LAYER_FIELDS = "layer_grad_norms,layer_weight_norms,layer_update_norms"


# ------------------------------------------------------------------------------------------- the watcher

_WATCHER = r"""
import json, sys, threading, time, http.client
port, pid = int(sys.argv[1]), int(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies, rss_kb = [], 0
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
while not stop.is_set() or len(latencies) < 3:
    t = time.perf_counter()
    conn.request("GET", "/healthz")
    conn.getresponse().read()
    latencies.append(time.perf_counter() - t)
    with open(f"/proc/{pid}/status") as f:
        rss_kb = max([rss_kb] + [int(l.split()[1]) for l in f if l.startswith("VmRSS:")])
    time.sleep(0.01)
print(json.dumps({"healthz_s": latencies, "rss_kb": rss_kb}))
"""


@dataclass
class Watched:
    healthz_s: list[float]
    rss_mb: float
    """the highest RSS sampled while the request was served"""
    peak_mb: float = 0.0
    """the server's VmHWM after it: its peak RSS since it started"""


def _vm(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(key)


@contextmanager
def watching(server: ServerProcess) -> Iterator[Watched]:
    """Poll /healthz and sample the server's RSS from another process (this one may be busy parsing an answer)
    while the block runs."""
    assert server.proc is not None
    watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(server.port), str(server.proc.pid)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out = Watched([], 0.0)
    try:
        time.sleep(0.1)
        yield out
    finally:
        stdout, _ = watcher.communicate("", timeout=60)
    seen = json.loads(stdout)
    out.healthz_s, out.rss_mb = seen["healthz_s"], seen["rss_kb"] / 1024
    out.peak_mb = _vm(server.proc.pid, "VmHWM")


def _held(w: Watched, what: str) -> None:
    print(f"{what}: peak RSS {w.peak_mb:.0f} MB (sampled while served {w.rss_mb:.0f} MB), /healthz max "
          f"{1000 * max(w.healthz_s):.1f} ms over {len(w.healthz_s)} polls")
    assert w.peak_mb <= PEAK_RSS_MB, f"{what}: the server's peak RSS was {w.peak_mb:.0f} MB"
    assert max(w.healthz_s) <= HEALTHZ_S, f"{what}: /healthz took {max(w.healthz_s):.3f} s"


def _refused(r: httpx.Response, status: int, setting: str | None, message: str) -> None:
    assert r.status_code == status, r.text[:500]
    detail = r.json()["detail"]
    text = json.dumps(detail)
    assert message in text, text[:500]
    if setting is not None:
        assert detail[0]["setting"] == setting and f"({setting})" in detail[0]["msg"], detail


# --------------------------------------------------------------------------------------- the servers

@dataclass
class Target:
    server: ServerProcess
    http: httpx.Client
    backend: str
    big_run: str = ""


def _binary_columns(layers: list[str], first: int, n: int, rng: np.random.Generator) -> bytes:
    head = json.dumps({"n": n, "fields": ["step", "layer_grad_norms"], "layers": layers}).encode()
    steps = np.arange(first, first + n, dtype="<i8").tobytes()
    values = rng.lognormal(0.0, 0.3, (n, len(layers))).astype("<f8").tobytes()
    return b"".join([BINARY_MAGIC, struct.pack("<I", len(head)), head, steps, values])


@pytest.fixture(scope="module", params=BACKENDS)
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A server with the default limits on each backend, holding a run of 10,000 layers × 1,200 steps (its
    layer grad norms: 12 million values, stored through the API in batches within the limits)."""
    tmp = tmp_path_factory.mktemp(f"abuse-{request.param}")
    url, schema = new_database_url(request.param, tmp)
    server = ServerProcess(url, env={"GRADWATCH_DETECTION": "false", "GRADWATCH_WEBHOOK_DELIVERY": "false"},
                           log_path=tmp / "server.log")
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            t = Target(server, http, request.param, new_run_id("big"))
            layers = [f"layer.{i:05d}" for i in range(BIG_LAYERS)]
            assert http.put(f"/v1/runs/{t.big_run}", json={"project": "abuse", "layers": layers}).status_code == 201
            rng = np.random.default_rng(1)
            per_batch = 49  # 490,049 values, 4 MB: within GRADWATCH_MAX_BATCH_VALUES (500,000)
            for first in range(0, BIG_STEPS, per_batch):
                n = min(per_batch, BIG_STEPS - first)
                r = http.post(f"/v1/runs/{t.big_run}/steps", content=_binary_columns(layers, first, n, rng),
                              headers={"content-type": BINARY_CONTENT_TYPE})
                assert r.status_code == 200, r.text[:500]
            yield t
    finally:
        server.stop()
        if schema:
            schema.drop()


# ------------------------------------------------------------------------------- finding 1: reads

def test_series_of_every_layer_of_a_big_run_is_refused_naming_the_setting(target: Target) -> None:
    """Was: 322 MB in 28 s, 1.79 GB RSS, /healthz 4.4 s."""
    with watching(target.server) as w:
        r = target.http.get(f"/v1/runs/{target.big_run}/series", params={"fields": LAYER_FIELDS})
    _refused(r, 422, "GRADWATCH_MAX_RESPONSE_VALUES", "the answer would hold at least")
    _held(w, f"{target.backend} series of 3 layer fields × 10,000 layers × 1,200 steps")


def test_steps_of_a_big_run_are_refused_and_a_page_within_the_limit_is_served(target: Target) -> None:
    """/steps capped steps, not values: a 10,000-step page of a 10,000-layer run is refused; with no limit
    asked, the default page is as many steps as the limit allows (33 of 30,006 values), served under the same
    watch."""
    with watching(target.server) as w:
        r = target.http.get(f"/v1/runs/{target.big_run}/steps", params={"limit": 10_000})
    _refused(r, 422, "GRADWATCH_MAX_RESPONSE_VALUES", "ask for fewer steps")
    _held(w, f"{target.backend} /steps?limit=10000 of a 10,000-layer run")
    with watching(target.server) as w:
        r = target.http.get(f"/v1/runs/{target.big_run}/steps")
    assert r.status_code == 200 and len(r.json()["steps"]) == 33
    assert len(r.json()["steps"][0]["layer_grad_norms"]) == BIG_LAYERS
    _held(w, f"{target.backend} /steps default page (33 steps) served ({len(r.content) / 1e6:.1f} MB)")
    assert target.http.get(f"/v1/runs/{target.big_run}/steps", params={"limit": 34}).status_code == 422


def test_a_downsampled_series_of_one_layer_of_the_big_run_is_served(target: Target) -> None:
    with watching(target.server) as w:
        r = target.http.get(f"/v1/runs/{target.big_run}/series",
                            params={"fields": "layer_grad_norms", "layers": "layer.00007", "max_points": 200})
    assert r.status_code == 200, r.text[:300]
    assert [s["layer"] for s in r.json()["series"]] == ["layer.00007"]
    _held(w, f"{target.backend} downsampled series of one layer")


def test_a_layer_named_1500_times_is_refused(target: Target) -> None:
    """Was: 35.8 MB from a 1-layer, 1,000-step run (PostgreSQL)."""
    run_id = new_run_id()
    http = target.http
    assert http.put(f"/v1/runs/{run_id}", json={"project": "abuse", "layers": ["l1"]}).status_code == 201
    steps = [{"step": i, "loss": 1.0, "layer_grad_norms": [0.5]} for i in range(1000)]
    assert http.post(f"/v1/runs/{run_id}/steps", json={"steps": steps}).status_code == 200
    with watching(target.server) as w:
        r = http.get(f"/v1/runs/{run_id}/series",
                     params={"fields": "layer_grad_norms", "layers": ",".join(["l1"] * 1500)})
    _refused(r, 422, None, "layer 'l1' is named more than once")
    assert r.json()["detail"][0]["loc"] == ["query", "layers"]
    _held(w, f"{target.backend} layers=l1 ×1500")
    r = http.get(f"/v1/runs/{run_id}/series", params={"fields": "layer_grad_norms", "layers": "l1"})
    assert r.status_code == 200 and len(r.json()["series"][0]["values"]) == 1000


def test_fields_repeated_are_a_client_error_not_an_outage(target: Target) -> None:
    """Finding 6: 2,000 (1,700 on PostgreSQL) repeats of `loss` answered 503 "database unavailable"."""
    for repeats in (1700, 2000):
        r = target.http.get(f"/v1/runs/{target.big_run}/series", params={"fields": ",".join(["loss"] * repeats)})
        _refused(r, 422, None, "field 'loss' is named more than once")
    r = target.http.get(f"/v1/runs/{target.big_run}/series", params={"fields": "loss,grad_norm"})
    assert r.status_code == 200


def test_a_query_naming_more_layers_than_a_run_may_have_is_refused(target: Target) -> None:
    names = ",".join(f"{i:x}" for i in range(10_001))  # 45 KB of URL, commas as they are
    r = target.http.get(f"/v1/runs/{target.big_run}/series?fields=layer_grad_norms&layers={names}")
    _refused(r, 422, "GRADWATCH_MAX_RUN_LAYERS", "the query names 10001 layer")


def test_the_runs_list_carries_layer_counts_not_names(target: Target) -> None:
    """Was: 60 runs of 10,000 layer names of 256 characters; `GET /v1/runs?limit=1000` returned 155 MB and
    peaked at 1.19 GB RSS."""
    http = target.http
    project = f"wide-{new_run_id()}"
    for k in range(60):
        layers = [f"{k:02d}.{i:05d}".ljust(256, "x") for i in range(BIG_LAYERS)]
        assert http.put(f"/v1/runs/{new_run_id()}", json={"project": project, "layers": layers}).status_code == 201
    with watching(target.server) as w:
        r = http.get("/v1/runs", params={"limit": 1000})
    assert r.status_code == 200
    listed = [run for run in r.json()["runs"] if run["project"] == project]
    assert len(listed) == 60 and all(run["n_layers"] == BIG_LAYERS and "layers" not in run for run in listed)
    assert len(r.content) < 1_000_000, len(r.content)
    _held(w, f"{target.backend} GET /v1/runs?limit=1000 over 60 runs of 10,000 long layer names")
    one = http.get(f"/v1/runs/{listed[0]['run_id']}").json()  # one run still names its layers
    assert len(one["layers"]) == one["n_layers"] == BIG_LAYERS


# ------------------------------------------------------------------------------ finding 2: ingest

def test_a_16_mb_json_batch_of_8_million_values_is_refused_before_parsing(target: Target) -> None:
    """Was: 800 steps × 10,000 layers in 16 MB of JSON: 130 MB → 1.2 GB RSS, 13.5 s."""
    row = "[" + ",".join(["0"] * BIG_LAYERS) + "]"
    body = ('{"steps":[' + ",".join(f'{{"step":{BIG_STEPS + i},"layer_grad_norms":{row}}}' for i in range(800))
            + "]}").encode()
    assert 15_000_000 < len(body) <= 16 * 1024 * 1024
    with watching(target.server) as w:
        r = target.http.post(f"/v1/runs/{target.big_run}/steps", content=body,
                             headers={"content-type": "application/json"})
    _refused(r, 413, "GRADWATCH_MAX_BATCH_VALUES", "the batch has about")
    _held(w, f"{target.backend} 16 MB JSON batch of 800 × 10,000")
    assert target.http.get(f"/v1/runs/{target.big_run}").json()["n_steps"] == BIG_STEPS  # nothing was stored


def test_a_binary_batch_over_the_value_limit_is_refused(target: Target) -> None:
    layers = [f"layer.{i:05d}" for i in range(BIG_LAYERS)]
    body = _binary_columns(layers, BIG_STEPS, 51, np.random.default_rng(2))  # 510,051 values, 4 MB
    r = target.http.post(f"/v1/runs/{target.big_run}/steps", content=body,
                         headers={"content-type": BINARY_CONTENT_TYPE})
    _refused(r, 413, "GRADWATCH_MAX_BATCH_VALUES", "the batch has 510051 values; the limit is 500000 values")


# ------------------------------------------------------------------ finding 4: stored JSON sizes

def test_config_limit_holds_as_the_database_gives_it_back(target: Target) -> None:
    """PostgreSQL's jsonb writes 1e308 out as a 309-digit integer: 9,000 of them (a 108 KB PUT) were accepted and
    every read of the run was 5.58 MB. The size is checked again as read back, before the PUT commits."""
    run_id = new_run_id()
    r = target.http.put(f"/v1/runs/{run_id}", content=b'{"config": {"a": [' + b",".join([b"1e308"] * 9000) + b"]}}",
                        headers={"content-type": "application/json"})
    if r.status_code == 422:
        _refused(r, 422, "GRADWATCH_MAX_CONFIG_BYTES", "config as the database stores it is")
        assert target.http.get(f"/v1/runs/{run_id}").status_code == 404  # rolled back
    else:  # SQLite keeps the document's text as sent
        assert target.backend == "sqlite" and r.status_code == 201, r.text[:300]
    got = target.http.get(f"/v1/runs/{run_id}")
    assert got.status_code == 404 or len(json.dumps(got.json()["config"], separators=(",", ":"))) <= 65_536
    listed = target.http.get("/v1/runs", params={"limit": 1000})
    assert listed.status_code == 200 and len(listed.content) < 2_000_000


def test_a_list_page_over_the_stored_json_bound_is_refused(target: Target) -> None:
    http = target.http
    project = f"docs-{new_run_id()}"
    config = {"k": "v" * 65_000}
    for _ in range(140):  # 140 × 65 KB: 9.1 MB of config, over the 8 MiB of GRADWATCH_MAX_RESPONSE_BYTES
        assert http.put(f"/v1/runs/{new_run_id()}", json={"project": project, "config": config}).status_code == 201
    r = http.get("/v1/runs", params={"project": project, "limit": 1000})
    _refused(r, 422, "GRADWATCH_MAX_RESPONSE_BYTES", "ask for fewer runs at a time")
    r = http.get("/v1/runs", params={"project": project, "limit": 100})
    assert r.status_code == 200 and len(r.json()["runs"]) == 100 and r.json()["count"] == 140


# ------------------------------------------------------------------- finding 5, 9: query and body

@pytest.mark.parametrize(("since", "found"), [("0001-01-01T00:00:00+14:00", True),
                                              ("9999-12-31T23:59:59-14:00", False)])
def test_updated_since_at_the_ends_of_time_is_answered(target: Target, since: str, found: bool) -> None:
    r = target.http.get("/v1/runs", params={"updated_since": since, "limit": 5})
    assert r.status_code == 200, r.text
    assert bool(r.json()["runs"]) is found


@pytest.mark.parametrize("trailer", [gzip.compress(b'{"name": "second"}'), b"junk after the member"],
                         ids=["second-member", "junk"])
def test_gzip_with_anything_after_its_member_is_refused(target: Target, trailer: bytes) -> None:
    run_id = new_run_id()
    body = gzip.compress(b'{"project": "abuse", "name": "first"}') + trailer
    r = target.http.put(f"/v1/runs/{run_id}", content=body,
                        headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 400 and "after its end" in r.json()["detail"], r.text
    assert target.http.get(f"/v1/runs/{run_id}").status_code == 404
    r = target.http.put(f"/v1/runs/{run_id}", content=gzip.compress(b'{"project": "abuse"}'),
                        headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 201


# --------------------------------------------------------------------------- finding 8: targets

@pytest.mark.parametrize("url", ["http://[fec0::1]/hook", "http://[fec0:1234::5]:8080/", "http://[fe80::1%eth0]/",
                                 "http://[fe80::1%25eth0]/", "http://[2001:db8::1%lo]/"])
def test_site_local_and_zone_id_targets_are_refused(target: Target, url: str) -> None:
    with pytest.raises(TargetRefused):
        check_target(url, TargetPolicy())
    r = target.http.post("/v1/webhooks", json={"url": url})
    assert r.status_code == 422, r.text


def test_site_local_is_not_public() -> None:
    import ipaddress

    assert address_problem(ipaddress.ip_address("fec0::1")) == "a site-local address"
    assert address_problem(ipaddress.ip_address("2606:4700::1111")) is None


# ------------------------------------------------------------ finding 3: one delivery, one deadline

class Trickler:
    """A receiver that reads the request, then answers 30 bytes every 1.5 s, for as long as the sender waits."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/slow"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(body) < length:
                    body += conn.recv(65536)
                answer = b"HTTP/1.1 200 OK\r\ncontent-length: 600\r\n\r\n" + b"x" * 600
                for i in range(0, len(answer), 30):
                    conn.sendall(answer[i:i + 30])
                    if self._stop.wait(1.5):
                        return
            except OSError:
                return  # the sender gave up: what the deadline is for

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def _explode(http: httpx.Client, project: str) -> float:
    """A new run whose second step's grad norm is NaN (a critical incident); returns when its commit was
    acknowledged (perf_counter)."""
    run_id = new_run_id()
    assert http.put(f"/v1/runs/{run_id}", json={"project": project}).status_code == 201
    r = http.post(f"/v1/runs/{run_id}/steps", json={"steps": [{"step": 0, "loss": 1.0, "grad_norm": 1.0},
                                                            {"step": 1, "loss": 1.0, "grad_norm": "NaN"}]})
    assert r.status_code == 200 and r.json()["raised_incidents"], r.text
    return time.perf_counter()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_trickling_receiver_delays_no_other_subscription(backend: str, tmp_path: Path) -> None:
    """Was: with timeout 2 s, each attempt to a receiver sending 30 bytes every 1.5 s took 45 s, and another
    project's alert arrived 44 s late. Now an attempt ends at the deadline, and the other subscription's
    latency is what it is without the trickler (within a second)."""
    url, schema = new_database_url(backend, tmp_path)
    port = free_port()
    server = ServerProcess(url, port=port, log_path=tmp_path / "server.log", env={
        "GRADWATCH_WEBHOOK_ALLOWED_TARGETS": "127.0.0.1", "GRADWATCH_WEBHOOK_TIMEOUT_S": "2",
        "GRADWATCH_WEBHOOK_RETRY_BASE_S": "0.5", "GRADWATCH_WEBHOOK_RETRY_MAX_DELAY_S": "1",
        "GRADWATCH_WEBHOOK_POLL_S": "0.5"})
    trickler = Trickler()
    try:
        with server, Receiver() as normal, httpx.Client(base_url=server.url, timeout=60) as http:
            normal_sub = http.post("/v1/webhooks", json={"url": normal.url, "project": "b"}).json()

            def latencies(n: int) -> list[float]:
                out: list[float] = []
                for k in range(n):
                    acked = _explode(http, "b")
                    got = normal.wait_for(lambda rs, k=k: len(rs) > k, timeout=30)  # type: ignore[misc]
                    out.append(got[k].at - acked)
                    time.sleep(0.3)  # spread over more than one trickled attempt
                return out

            before = latencies(5)
            slow = [http.post("/v1/webhooks", json={"url": trickler.url, "project": "a"}).json() for _ in range(2)]
            for _ in range(3):
                _explode(http, "a")
            time.sleep(0.5)  # the trickler holds its senders now
            normal.received.clear()
            during = latencies(10)
            assert trickler.connections >= 2
            time.sleep(2.5)
            attempts = [a for sub in slow
                        for d in http.get(f"/v1/webhooks/{sub['id']}/deliveries").json()["deliveries"]
                        for a in d["attempts"]]
        print(f"{backend}: normal subscription's latency without the trickler max {max(before) * 1000:.0f} ms, "
              f"with it max {max(during) * 1000:.0f} ms; trickled attempts took "
              f"{sorted(round(a['latency_ms']) for a in attempts)} ms")
        assert max(during) <= max(before) + 1.0, (before, during)
        assert attempts and all(a["latency_ms"] <= 2000 + 1000 and a["outcome"] != "delivered" for a in attempts)
        assert all("GRADWATCH_WEBHOOK_TIMEOUT_S" in (a["error"] or "") for a in attempts)
        assert normal_sub["id"] not in {s["id"] for s in slow}
    finally:
        trickler.close()
        if schema:
            schema.drop()


# --------------------------------------------------------- finding 10: the alert names what it saw

@pytest.mark.parametrize("backend", BACKENDS)
def test_webhook_urls_carry_the_serving_port_and_the_message_its_value(backend: str, tmp_path: Path) -> None:
    url, schema = new_database_url(backend, tmp_path)
    port = free_port()
    server = ServerProcess(url, port=port, log_path=tmp_path / "server.log", env={
        "GRADWATCH_WEBHOOK_ALLOWED_TARGETS": "127.0.0.1", "GRADWATCH_WEBHOOK_POLL_S": "0.2"})
    try:
        with server, Receiver() as receiver, httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.post("/v1/webhooks", json={"url": receiver.url}).status_code == 201
            run_id = new_run_id()
            assert http.put(f"/v1/runs/{run_id}", json={"project": "p", "layers": ["a"]}).status_code == 201
            r = http.post(f"/v1/runs/{run_id}/steps", json={"steps": [
                {"step": 49, "loss": 1.0, "grad_norm": 1.0, "layer_grad_norms": [1.0]},
                {"step": 50, "loss": "NaN", "grad_norm": "Infinity", "layer_grad_norms": ["Infinity"]}]})
            incident = r.json()["raised_incidents"][0]
            assert incident["message"].startswith("loss is NaN at step 50"), incident
            assert incident["value"] == "NaN", incident
            body = receiver.wait_for(lambda rs: bool(rs))[0].json()
        assert body["externalURL"] == f"http://127.0.0.1:{port}"
        assert body["alerts"][0]["generatorURL"].startswith(f"http://127.0.0.1:{port}/v1/runs/{run_id}")
    finally:
        if schema:
            schema.drop()


# ------------------------------------------------------------ finding 7: exposure under any launcher

def _outward_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


@contextmanager
def uvicorn_app(url: str, tmp_path: Path, host: str, **env: str) -> Iterator[tuple[int, Path]]:
    """The app under plain uvicorn (not `gradwatch serve`, whose own bind check never runs)."""
    ServerProcess(url).migrate()
    port = free_port()
    log = tmp_path / f"uvicorn-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "gradwatch_service.app:create_app",
                                 "--host", host, "--port", str(port)],
                                env={**ServerProcess(url, env=env).env}, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            yield port, log
        finally:
            end_process(proc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_no_token_only_loopback_is_served_whatever_the_launcher(backend: str, tmp_path: Path) -> None:
    url, schema = new_database_url(backend, tmp_path)
    outward = _outward_address()
    try:
        with uvicorn_app(url, tmp_path, "0.0.0.0") as (port, _log):
            local = f"http://127.0.0.1:{port}"
            assert httpx.get(f"{local}/v1/runs").status_code == 200  # this machine: open, as before
            # a reverse proxy on this machine passing on a client from elsewhere (uvicorn trusts 127.0.0.1's
            # X-Forwarded-For by default)
            forwarded = {"x-forwarded-for": "203.0.113.9"}
            for method, path in (("GET", "/v1/runs"), ("PUT", "/v1/runs/r1"), ("GET", "/metrics")):
                r = httpx.request(method, local + path, headers=forwarded, json={"project": "p"})
                assert r.status_code == 403, (path, r.text)
                assert "gradwatch token create" in r.json()["detail"] and "--insecure" in r.json()["detail"]
            assert httpx.get(f"{local}/healthz", headers=forwarded).status_code == 200
            assert httpx.get(f"{local}/readyz", headers=forwarded).status_code == 200
            if outward is not None:  # straight from the network: the request's own peer address
                r = httpx.get(f"http://{outward}:{port}/v1/runs")
                assert r.status_code == 403 and "gradwatch token create" in r.json()["detail"]
            assert httpx.get(f"{local}/v1/runs/r1").status_code == 404  # nothing was created
        with uvicorn_app(url, tmp_path, "0.0.0.0", GRADWATCH_INSECURE="true") as (port, log):
            local = f"http://127.0.0.1:{port}"
            r = httpx.get(f"{local}/v1/runs", headers={"x-forwarded-for": "203.0.113.9"})
            assert r.status_code == 200  # what insecure mode asks for
            ready = httpx.get(f"{local}/readyz").json()
            assert ready["insecure"] is True and "gradwatch token create" in ready["warning"]
            assert "insecure mode" in log.read_text()
    finally:
        if schema:
            schema.drop()


def test_webhook_urls_carry_the_port_under_plain_uvicorn_too(tmp_path: Path) -> None:
    """No `serve` to pass the port on: the app learns it from the requests it serves."""
    url, _ = new_database_url("sqlite", tmp_path)
    env = {"GRADWATCH_WEBHOOK_ALLOWED_TARGETS": "127.0.0.1", "GRADWATCH_WEBHOOK_POLL_S": "0.2"}
    with uvicorn_app(url, tmp_path, "127.0.0.1", **env) as (port, _log), Receiver() as receiver, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        assert http.post("/v1/webhooks", json={"url": receiver.url}).status_code == 201
        _explode(http, "p")
        body = receiver.wait_for(lambda rs: bool(rs))[0].json()
    assert port != 8000 and body["externalURL"] == f"http://127.0.0.1:{port}"
