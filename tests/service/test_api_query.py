"""The query API over HTTP: runs with filters, raw steps, downsampled series, health, the OpenAPI schema."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import httpx

from ..support.databases import new_run_id
from ..support.serverproc import ServerProcess


def _run(http: httpx.Client, **fields: object) -> str:
    run_id = new_run_id()
    assert http.put(f"/v1/runs/{run_id}", json=fields).status_code == 201
    return run_id


def test_list_runs_filters_by_project_status_and_update_time(http: httpx.Client) -> None:
    project = new_run_id("proj")
    a = _run(http, project=project)
    time.sleep(0.02)
    since = datetime.now(UTC).isoformat()
    b = _run(http, project=project, status="finished")
    _run(http, project=project + "-other")

    listed = http.get("/v1/runs", params={"project": project}).json()
    assert [r["run_id"] for r in listed["runs"]] == [b, a]  # most recently updated first
    assert listed["count"] == 2

    def ids(**params: str) -> list[str]:
        return [r["run_id"] for r in http.get("/v1/runs", params={"project": project, **params}).json()["runs"]]

    assert ids(status="finished") == [b]
    assert ids(updated_since=since) == [b]
    # the same instant written with another UTC offset selects the same runs
    shifted = datetime.fromisoformat(since).astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()
    assert ids(updated_since=shifted) == [b]
    page = http.get("/v1/runs", params={"project": project, "limit": 1, "offset": 1}).json()
    assert [r["run_id"] for r in page["runs"]] == [a] and page["count"] == 2
    assert http.get("/v1/runs", params={"status": "exploded"}).status_code == 422


def test_series_downsampling_keeps_spikes_and_nonfinite_points(http: httpx.Client) -> None:
    run_id = _run(http, layers=["enc", "dec"])
    steps = []
    for i in range(2000):
        g = 1.0 + 0.001 * (i % 10)
        steps.append({"step": i, "loss": 2.0, "grad_norm": g, "layer_grad_norms": [g, g / 2]})
    steps[1234]["grad_norm"] = 5e4
    steps[1500]["layer_grad_norms"] = [1.0, "NaN"]
    steps[1999]["loss"] = "Infinity"
    for k in range(0, 2000, 500):
        assert http.post(f"/v1/runs/{run_id}/steps", json={"steps": steps[k: k + 500]}).status_code == 200

    r = http.get(f"/v1/runs/{run_id}/series",
                 params={"fields": "loss,grad_norm,layer_grad_norms", "layers": "dec", "max_points": 100})
    assert r.status_code == 200, r.text
    by_field = {(s["field"], s["layer"]): dict(zip(s["steps"], s["values"], strict=True)) for s in r.json()["series"]}
    assert set(by_field) == {("loss", None), ("grad_norm", None), ("layer_grad_norms", "dec")}
    assert by_field[("grad_norm", None)][1234] == 5e4
    assert by_field[("layer_grad_norms", "dec")][1500] == "NaN"
    assert by_field[("loss", None)][1999] == "Infinity"
    assert all(len(points) <= 103 for points in by_field.values())

    window = http.get(f"/v1/runs/{run_id}/series", params={"fields": "grad_norm", "start": 1230, "end": 1240}).json()
    assert window["series"][0]["steps"] == list(range(1230, 1241))


def test_series_rejects_unknown_fields_and_layers(http: httpx.Client) -> None:
    run_id = _run(http, layers=["a"])
    r = http.get(f"/v1/runs/{run_id}/series", params={"fields": "loss,colour"})
    assert r.status_code == 422 and "colour" in r.json()["detail"][0]["msg"]
    r = http.get(f"/v1/runs/{run_id}/series", params={"fields": "layer_grad_norms", "layers": "b"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "layers"]
    assert http.get("/v1/runs/nope/series").status_code == 404


def test_steps_range_and_limit(http: httpx.Client) -> None:
    run_id = _run(http)
    http.post(f"/v1/runs/{run_id}/steps", json={"steps": [{"step": i, "loss": float(i)} for i in range(30)]})
    got = http.get(f"/v1/runs/{run_id}/steps", params={"start": 10, "end": 19, "limit": 5}).json()["steps"]
    assert [s["step"] for s in got] == [10, 11, 12, 13, 14]
    assert all(s["time"] > 1.7e9 for s in got)  # stamped on receipt when the client sent none


def test_health_and_readiness(http: httpx.Client, server: ServerProcess) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    database = "sqlite" if server.database_url.startswith("sqlite") else "postgresql"
    assert http.get("/readyz").json() == {"status": "ok", "database": database}


def test_openapi_documents_every_route_with_examples(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"StepBatch", "RunUpsert", "IngestResult", "RunPublic", "SeriesPublic"} <= set(schemas)
    post = spec["paths"]["/v1/runs/{run_id}/steps"]["post"]
    example = post["requestBody"]["content"]["application/json"]["example"]
    assert example["steps"][1]["loss"] == "NaN"
    assert {"404", "409", "413", "415"} <= set(post["responses"])
    assert "example" in spec["paths"]["/v1/runs/{run_id}"]["put"]["requestBody"]["content"]["application/json"]
    assert spec["paths"]["/v1/runs/{run_id}/series"]["get"]["parameters"]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if "requestBody" in op:
                assert "example" in op["requestBody"]["content"]["application/json"], (method, path)
            ok = op["responses"].get("200") or op["responses"]["201"]
            content = ok["content"]["application/json"]
            ref = content.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
            assert "example" in content or (ref and "examples" in schemas[ref]), (method, path)
