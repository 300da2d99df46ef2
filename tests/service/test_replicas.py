"""Several service processes on one database: each run's batches are ordered by the database, not by memory.

Two uvicorn workers (SQLite: writers queue on an flock; PostgreSQL: the run row is locked) take the same
batches at once, twice over; every step is stored once and the detector state stays the one a single
process would have built.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ..support.databases import BACKENDS, new_database_url, new_run_id
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
