"""Several service processes on one database: each run's batches are ordered by the database, not by memory.

Two uvicorn workers (SQLite: writers queue on an flock; PostgreSQL: the run row is locked) take the same
batches at once, twice over; every step is stored once and the detector state stays the one a single
process would have built. Two service processes on one PostgreSQL schema taking turns with a run's batches
store the steps, incidents and webhook events one process stores from the same batches.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gradwatch_service.storage.db import make_engine

from ..support.databases import BACKENDS, PostgresSchema, new_database_url, new_run_id, require_postgres
from ..support.receiver import Receiver
from ..support.replay_check import assert_matches_replay
from ..support.serverproc import ServerProcess


@pytest.fixture(params=BACKENDS)
def two_workers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    url, schema = new_database_url(request.param, tmp_path)
    proc = ServerProcess(url, args=["--workers", "2"], log_path=tmp_path / "server.log")
    proc.start()
    yield proc
    proc.stop()
    if schema:
        schema.drop()


@pytest.mark.slow
def test_two_workers_store_each_step_once_and_agree_on_incidents(two_workers: ServerProcess) -> None:
    run_id = new_run_id()
    with httpx.Client(base_url=two_workers.url, timeout=60) as http:
        assert http.put(f"/v1/runs/{run_id}", json={"layers": ["a", "b"]}).status_code == 201
    batches = []
    for k in range(12):
        steps = [{"step": k * 25 + i, "loss": 1.0, "grad_norm": 1.0, "layer_grad_norms": [0.7, 0.7]}
                 for i in range(25)]
        if k == 9:
            steps[3]["layer_grad_norms"] = [0.7, "NaN"]
        batches.append({"batch_id": f"b{k}", "steps": steps})

    def send(batch: dict) -> tuple[int, int]:
        with httpx.Client(base_url=two_workers.url, timeout=60) as c:
            r = c.post(f"/v1/runs/{run_id}/steps", json=batch)
        assert r.status_code == 200, r.text
        return r.json()["accepted"], r.json()["duplicates"]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, batches + batches))
    assert sum(a for a, _ in results) == 300 and sum(d for _, d in results) == 300
    with httpx.Client(base_url=two_workers.url, timeout=60) as http:
        steps = http.get(f"/v1/runs/{run_id}/steps", params={"limit": 1000}).json()["steps"]
        incidents = http.get(f"/v1/runs/{run_id}/incidents").json()["incidents"]
    assert [s["step"] for s in steps] == list(range(300))
    # batches raced, so some arrived after later ones (late: stored, not judged); the NaN step is judged only
    # if its batch was not late, and then it opened exactly one incident
    nonfinite = [i for i in incidents if i["signature"] == "nonfinite"]
    late_nan = next(s for s in steps if s["step"] == 228)["late"]
    assert len(nonfinite) == (0 if late_nan else 1)


def _exploding_batches(n_batches: int, size: int) -> list[dict[str, Any]]:
    """An exploding run's batches: healthy, a 2x-a-step climb, a NaN, healthy again, every 150 steps."""
    batches = []
    for k in range(n_batches):
        steps = []
        for t in range(k * size, (k + 1) * size):
            g = 1.0 + 0.1 * math.sin(t)
            phase = t % 150
            if 100 <= phase < 112:
                g *= 2.0 ** (phase - 99)
            layer = [g / 2, g / 3, g / 4, g / 5]
            if phase == 112:
                g, layer[2] = "NaN", "Infinity"
            steps.append({"step": t, "time": 1.7e9 + t, "loss": 2.0 + 0.05 * math.cos(t), "grad_norm": g,
                          "lr": 0.01, "layer_grad_norms": layer, "layer_weight_norms": [3.0, 4.0, 5.0, 6.0]})
        batches.append({"batch_id": f"b{k}", "steps": steps})
    return batches


def _received_events(receiver: Receiver) -> Counter[tuple[Any, ...]]:
    firsts = {r.msg_id: r for r in receiver.accepted()}
    out: Counter[tuple[Any, ...]] = Counter()
    for r in firsts.values():
        body = r.json()
        i = body["gradwatch"]["incident"]
        out[(i["seq"], body["status"], i["signature"], i["severity"], i["opened_step"], i["layer"])] += 1
    return out


def _snapshot(base_url: str, headers: dict[str, str], run_id: str) -> tuple[list[Any], list[Any]]:
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as http:
        steps = http.get(f"/v1/runs/{run_id}/steps", params={"limit": 100_000}).json()["steps"]
        incidents = http.get(f"/v1/runs/{run_id}/incidents", params={"limit": 1000}).json()["incidents"]
    keep = ("seq", "signature", "severity", "status", "opened_step", "last_step", "resolved_step", "layer", "value",
            "baseline", "message", "evidence")
    return steps, sorted(({k: i[k] for k in keep} for i in incidents), key=lambda i: i["seq"])


@pytest.mark.postgres
@pytest.mark.slow
def test_two_processes_on_one_postgresql_taking_turns_store_what_one_process_does(tmp_path: Path) -> None:
    """One sender alternates a run's batches between two service processes on one schema, and resends each batch
    to the other process while the next one is being stored; steps, detector state, incidents and webhook events
    are those of one process taking the same batches, and a replay of the stored steps."""
    require_postgres()
    env = {"GRADWATCH_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true", "GRADWATCH_WEBHOOK_POLL_S": "0.2"}
    batches = _exploding_batches(n_batches=30, size=25)
    shared, single = PostgresSchema(), PostgresSchema()
    run_id = new_run_id()
    try:
        with Receiver() as two_rx, Receiver() as one_rx, \
                ServerProcess(shared.url, env=env, log_path=tmp_path / "a.log") as a, \
                ServerProcess(shared.url, env=env, log_path=tmp_path / "b.log") as b, \
                ServerProcess(single.url, env=env, log_path=tmp_path / "one.log") as one:
            headers = dict(getattr(a, "headers", {}))
            for server, rx in ((a, two_rx), (one, one_rx)):
                with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
                    assert http.post("/v1/webhooks", json={"url": rx.url, "min_severity": "warning"}).status_code == 201
                    assert http.put(f"/v1/runs/{run_id}", json={"project": "replicas",
                                                                 "layers": ["a", "b", "c", "d"]}).status_code == 201
            clients = {s: httpx.Client(base_url=s.url, headers=headers, timeout=60) for s in (a, b, one)}
            try:
                def send(server: ServerProcess, batch: dict[str, Any]) -> dict[str, Any]:
                    r = clients[server].post(f"/v1/runs/{run_id}/steps", json=batch)
                    assert r.status_code == 200, r.text
                    return r.json()  # type: ignore[no-any-return]

                with ThreadPoolExecutor(2) as pool:
                    resend = None
                    for k, batch in enumerate(batches):
                        first, other = (a, b) if k % 2 == 0 else (b, a)
                        assert send(first, batch)["accepted"] == len(batch["steps"])
                        if resend is not None:
                            assert resend.result()["duplicates"] == len(batch["steps"])
                        resend = pool.submit(send, other, batch)  # races the next batch on the other process
                    assert resend is not None and resend.result()["accepted"] == 0
                for batch in batches:
                    send(one, batch)
            finally:
                for c in clients.values():
                    c.close()
            two_steps, two_incidents = _snapshot(a.url, headers, run_id)
            one_steps, one_incidents = _snapshot(one.url, headers, run_id)
            assert two_steps == one_steps and len(two_steps) == 750 and not any(s["late"] for s in two_steps)
            assert two_incidents == one_incidents
            assert {e["signature"] for i in one_incidents for e in i["evidence"]["timeline"]} >= {"nonfinite",
                                                                                                 "grad_growth"}
            engines = [make_engine(shared.url), make_engine(single.url)]
            try:
                replays = [assert_matches_replay(engine, run_id) for engine in engines]
            finally:
                for engine in engines:
                    engine.dispose()
            assert replays[0].events == replays[1].events
            events = Counter(replays[0].events)
            assert sum(events.values()) >= 8
            one_rx.wait_for(lambda _rs: sum(_received_events(one_rx).values()) >= sum(events.values()))
            two_rx.wait_for(lambda _rs: sum(_received_events(two_rx).values()) >= sum(events.values()))
            time.sleep(0.5)  # anything extra would arrive now
            assert _received_events(two_rx) == _received_events(one_rx)
            assert Counter((e[0], e[1], e[3]) for e in _received_events(two_rx).elements()) == events
            assert len(two_rx.received) == len({r.msg_id for r in two_rx.received})  # each event sent once
    finally:
        shared.drop()
        single.drop()
