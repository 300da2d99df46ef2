"""Ingest over HTTP, against a real uvicorn server on a loopback port, on SQLite and on PostgreSQL."""

from __future__ import annotations

import gzip
import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ..support.databases import SERVER_MAX_BODY_BYTES, new_run_id
from ..support.serverproc import ServerProcess

JSON = {"content-type": "application/json"}



def _run(http: httpx.Client, layers: list[str] | None = None, **fields: object) -> str:
    run_id = new_run_id()
    r = http.put(f"/v1/runs/{run_id}", json={"layers": layers, **fields})
    assert r.status_code == 201, r.text
    return run_id


def _post(http: httpx.Client, run_id: str, body: bytes | dict, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(f"/v1/runs/{run_id}/steps", content=content, headers=headers or JSON)


def test_put_creates_then_updates(http: httpx.Client) -> None:
    run_id = _run(http, layers=["a"], project="vision", name="first", config={"lr": 0.1})
    r = http.put(f"/v1/runs/{run_id}", json={"status": "finished", "layers": ["a", "b"]})
    assert r.status_code == 200
    body = r.json()
    assert (body["project"], body["name"], body["status"]) == ("vision", "first", "finished")
    assert body["layers"] == ["a", "b"]
    assert body["config"] == {"lr": 0.1}
    assert http.put(f"/v1/runs/{run_id}", json={"status": "finished"}).json()["updated_at"] >= body["created_at"]


def test_nonfinite_round_trip_over_the_wire(http: httpx.Client) -> None:
    run_id = _run(http, layers=["a", "b"])
    step = {"step": 0, "time": 1764000000.5, "loss": "NaN", "grad_norm": "Infinity", "lr": "-Infinity",
            "update_norm": 1e-300, "layer_grad_norms": ["NaN", "Infinity"], "layer_weight_norms": [None, "-Infinity"],
            "layer_update_norms": [0.0, -0.0], "scalars": {"acc": "NaN"}, "skipped": True}
    r = _post(http, run_id, {"batch_id": "b1", "steps": [step]})
    assert r.status_code == 200, r.text
    assert r.json() == {"run_id": run_id, "accepted": 1, "duplicates": 0, "last_step": 0, "open_incidents": [],
                        "raised_incidents": []}  # a skipped step is not judged
    got = http.get(f"/v1/runs/{run_id}/steps").json()["steps"][0]
    assert got == {**step, "late": False}
    series = http.get(f"/v1/runs/{run_id}/series", params={"fields": "loss,grad_norm,layer_grad_norms"}).json()
    assert [s["values"] for s in series["series"]] == [["NaN"], ["Infinity"], ["NaN"], ["Infinity"]]


def test_resend_reports_duplicates_and_a_changed_resend_is_409(http: httpx.Client) -> None:
    run_id = _run(http)
    batch = {"steps": [{"step": i, "loss": 1.0 / (i + 1)} for i in range(10)]}
    assert _post(http, run_id, batch).json()["accepted"] == 10
    again = _post(http, run_id, batch).json()
    assert (again["accepted"], again["duplicates"]) == (0, 10)
    changed = {"steps": [{"step": 10, "loss": 0.1}, {"step": 4, "loss": 99.0}, {"step": 5, "loss": 99.0}]}
    r = _post(http, run_id, changed)
    assert r.status_code == 409
    assert r.json()["detail"]["steps"] == [4, 5]
    assert "nothing of this batch was stored" in r.json()["detail"]["message"]
    run = http.get(f"/v1/runs/{run_id}").json()
    assert (run["n_steps"], run["last_step"]) == (10, 9)


def test_gzip_body_is_accepted(http: httpx.Client) -> None:
    run_id = _run(http)
    body = gzip.compress(json.dumps({"steps": [{"step": i, "loss": 0.5} for i in range(100)]}).encode())
    r = _post(http, run_id, body, {**JSON, "content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 100


def test_body_over_the_cap_is_413_and_loses_nothing(http: httpx.Client) -> None:
    run_id = _run(http)
    assert _post(http, run_id, {"steps": [{"step": 0, "loss": 1.0}]}).status_code == 200
    big = json.dumps({"steps": [{"step": i + 1, "loss": 1.0} for i in range(SERVER_MAX_BODY_BYTES // 20)]}).encode()
    assert len(big) > SERVER_MAX_BODY_BYTES
    r = _post(http, run_id, big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert http.get(f"/v1/runs/{run_id}").json()["n_steps"] == 1


def test_gzip_bomb_is_413_not_an_oom(http: httpx.Client, server: ServerProcess) -> None:
    run_id = _run(http)
    # 64 MiB of spaces (valid JSON whitespace) compress to ~64 KiB: under the cap on the wire, far over it inflated
    bomb = gzip.compress(b'{"steps": [' + b" " * (64 << 20) + b"]}", compresslevel=9)
    assert len(bomb) < SERVER_MAX_BODY_BYTES
    r = _post(http, run_id, bomb, {**JSON, "content-encoding": "gzip"})
    assert r.status_code == 413 and "decompressed" in r.json()["detail"]
    assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize(("headers", "status"), [
    ({"content-type": "text/plain"}, 415),
    ({**JSON, "content-encoding": "br"}, 415),
    ({**JSON, "content-encoding": "gzip"}, 400),  # claims gzip, is not
])
def test_wrong_content_type_or_encoding(http: httpx.Client, headers: dict[str, str], status: int) -> None:
    run_id = _run(http)
    r = _post(http, run_id, b'{"steps": []}', headers)
    assert r.status_code == status
    assert isinstance(r.json()["detail"], str)


@pytest.mark.parametrize(("body", "loc", "msg"), [
    (b'{"steps": [{"step": -1}]}', ["body", "steps", 0, "step"], "greater than or equal to 0"),
    (b'{"steps": [{"step": 0, "loss": "lots"}]}', ["body", "steps", 0, "loss"], "valid number"),
    (b'{"steps": [{"step": 0, "time": "NaN"}]}', ["body", "steps", 0, "time"], "finite"),
    (b'{"steps": [{"step": 0, "colour": 1}]}', ["body", "steps", 0, "colour"], "Extra inputs"),
    (b'{"stepz": []}', ["body", "steps"], "Field required"),
    (b'{"steps": [', ["body"], "JSON"),
])
def test_schema_errors_are_422_naming_the_field(http: httpx.Client, body: bytes, loc: list, msg: str) -> None:
    run_id = _run(http)
    r = _post(http, run_id, body)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"][: len(loc)] == loc and msg.lower() in e["msg"].lower() for e in errors), errors


def test_layer_count_mismatch_is_422_naming_the_step(http: httpx.Client) -> None:
    run_id = _run(http, layers=["a", "b"])
    r = _post(http, run_id, {"steps": [{"step": 3, "layer_grad_norms": [1, 2]},
                                       {"step": 4, "layer_grad_norms": [1, 2, 3]}]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "steps", 1, "layer_grad_norms"]  # as pydantic names a step
    assert http.get(f"/v1/runs/{run_id}").json()["n_steps"] == 0


def test_unknown_run_is_404(http: httpx.Client) -> None:
    r = _post(http, "never-created", {"steps": [{"step": 0}]})
    assert r.status_code == 404 and "PUT" in r.json()["detail"]
    assert http.get("/v1/runs/never-created").status_code == 404
    assert http.put("/v1/runs/bad id!", json={}).status_code == 422  # the run-id pattern (gradwatch.wire)


def test_concurrent_batches_and_resends_store_each_step_once(http: httpx.Client, server: ServerProcess) -> None:
    run_id = _run(http, layers=["a"])
    batches = [{"batch_id": f"b{k}", "steps": [{"step": k * 50 + i, "loss": float(i), "layer_grad_norms": [1.0]}
                                               for i in range(50)]} for k in range(8)]

    def send(b: dict) -> tuple[int, int]:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            out = _post(c, run_id, b).json()
        return out["accepted"], out["duplicates"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, batches + batches))
    assert sum(a for a, _ in results) == 400
    assert sum(d for _, d in results) == 400
    steps = http.get(f"/v1/runs/{run_id}/steps").json()["steps"]
    assert [s["step"] for s in steps] == list(range(400))


def test_json_floats_keep_full_precision(http: httpx.Client) -> None:
    run_id = _run(http)
    values = [math.pi, 1 / 3, 5e-324, 1.7976931348623157e308, 123456789.123456789]
    _post(http, run_id, {"steps": [{"step": i, "loss": v} for i, v in enumerate(values)]})
    got = [s["loss"] for s in http.get(f"/v1/runs/{run_id}/steps").json()["steps"]]
    assert got == values


def test_nul_characters_are_a_clear_422_not_a_database_error(http: httpx.Client) -> None:
    run_id = _run(http)
    r = http.put(f"/v1/runs/{run_id}", content=b'{"name": "a\\u0000b"}', headers=JSON)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
    r = _post(http, run_id, b'{"steps": [{"step": 0, "scalars": {"x\\u0000": 1.0}}]}')
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps", 0, "scalars", "x\x00"]
    assert http.get("/v1/runs", params={"project": "a\x00"}).status_code == 422
    assert http.get(f"/v1/runs/{run_id}").json()["n_steps"] == 0
