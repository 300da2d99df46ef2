"""Detection in the service: incidents open inside the ingest transaction, resolve, and come back to the job."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gradwatch import detect
from gradwatch.replay import read_trace, replay_run

from ..support.databases import new_run_id
from ..support.traces import require_labelled_traces

ROOT = Path(__file__).resolve().parents[2]



def _run(http: httpx.Client, layers: list[str], project: str = "det") -> str:
    run_id = new_run_id()
    assert http.put(f"/v1/runs/{run_id}", json={"project": project, "layers": layers}).status_code == 201
    return run_id


def _healthy(i: int, layers: int = 3) -> dict[str, Any]:
    wobble = 1.0 + 0.05 * math.sin(i)
    return {"step": i, "loss": 2.0 - i * 0.001, "grad_norm": wobble, "lr": 0.01, "update_norm": 0.001 * wobble,
            "layer_grad_norms": [wobble / 2] * layers, "layer_weight_norms": [3.0] * layers}


def _post(http: httpx.Client, run_id: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    r = http.post(f"/v1/runs/{run_id}/steps", json={"steps": steps})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_nan_in_one_layer_opens_a_critical_incident_naming_it(http: httpx.Client) -> None:
    run_id = _run(http, ["embed", "attn", "head"])
    assert _post(http, run_id, [_healthy(i) for i in range(40)])["open_incidents"] == []
    bad = _healthy(40)
    bad["layer_grad_norms"][1] = "NaN"
    out = _post(http, run_id, [bad])
    (inc,) = out["open_incidents"]
    assert (inc["signature"], inc["severity"], inc["layer"]) == ("nonfinite", "critical", "attn")
    assert inc["opened_step"] == 40
    assert inc["id"] == f"{run_id}#1" and inc["status"] == "open"
    listed = http.get(f"/v1/runs/{run_id}/incidents").json()["incidents"]
    assert listed[0]["evidence"]["opened"]["step"] == 40
    assert listed[0]["evidence"]["opened"]["values"]["grad_norm"] == bad["grad_norm"]


def test_incident_resolves_after_quiet_steps_and_flapping_is_one_incident(http: httpx.Client) -> None:
    run_id = _run(http, ["a", "b", "c"])
    _post(http, run_id, [_healthy(i) for i in range(40)])
    quiet = detect.DetectorConfig().resolve_after_steps
    steps = [_healthy(i) for i in range(40, 40 + 3 * quiet)]
    for k in (0, quiet // 2):  # fires twice within the hysteresis: one incident
        steps[k]["loss"] = "NaN"
    _post(http, run_id, steps)
    incidents = http.get(f"/v1/runs/{run_id}/incidents").json()["incidents"]
    nonfinite = [i for i in incidents if i["signature"] == "nonfinite"]
    assert len(nonfinite) == 1
    assert nonfinite[0]["status"] == "resolved"
    assert nonfinite[0]["resolved_step"] == 40 + quiet // 2 + quiet
    assert nonfinite[0]["last_step"] == 40 + quiet // 2


def test_late_steps_are_stored_flagged_and_not_judged(http: httpx.Client) -> None:
    run_id = _run(http, ["a", "b", "c"])
    _post(http, run_id, [_healthy(i) for i in range(20, 60)])
    late = _healthy(5)
    late["loss"] = "NaN"
    out = _post(http, run_id, [late])
    assert out["accepted"] == 1 and out["open_incidents"] == []
    stored = http.get(f"/v1/runs/{run_id}/steps", params={"start": 5, "end": 5}).json()["steps"][0]
    assert stored["late"] is True and stored["loss"] == "NaN"


def _trace(path: Path) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    layers = list(header["meta"]["param_shapes"])
    steps = []
    for line in lines[1:]:
        s = json.loads(line)
        out = {k: s.get(k) for k in ("step", "loss", "grad_norm", "lr", "update_norm")}
        for name in ("layer_grad_norms", "layer_weight_norms"):
            if s.get(name) is not None:
                out[name] = [s[name].get(layer) for layer in layers]
        steps.append(out)
    return header, layers, steps


def _offline_first_critical(path: Path) -> int | None:
    """The detectors run offline over the same trace, as `gradwatch replay` does."""
    run_id, steps = read_trace(str(path))
    for line in replay_run(run_id, steps, detect.DetectorConfig()):
        if line["severity"] == "critical":
            return int(line["step"])
    return None


@pytest.mark.parametrize("batch_size", [7, 500])
def test_a_real_diverging_trace_raises_the_same_alert_as_offline_replay(http: httpx.Client, batch_size: int) -> None:
    # the first late-diverging trace on which the offline detectors raise a critical alert at all
    for path in sorted(require_labelled_traces().dev.glob("*.jsonl")):
        with path.open() as trace:
            labels = json.loads(trace.readline())["labels"]
        if labels["outcome"] == "diverged" and labels["diverged_at"] >= 10:
            expected = _offline_first_critical(path)
            if expected is not None:
                break
    else:
        pytest.fail("the detectors raise no critical alert on any late-diverging dev trace")
    header, layers, steps = _trace(path)
    run_id = _run(http, layers)
    for k in range(0, len(steps), batch_size):
        _post(http, run_id, steps[k: k + batch_size])
    found = http.get(f"/v1/runs/{run_id}/incidents", params={"severity": "critical", "limit": 1000}).json()
    # state goes through the database between batches: the batch size must not change what is found
    assert min(i["opened_step"] for i in found["incidents"]) == expected
    assert header["run_id"] in path.name


def test_incident_list_filters(http: httpx.Client) -> None:
    project = new_run_id("p")
    run_id = _run(http, ["a", "b", "c"], project=project)
    steps = [_healthy(i) for i in range(41)]
    steps[40]["grad_norm"] = "Infinity"
    _post(http, run_id, steps)
    everything = http.get("/v1/incidents", params={"project": project}).json()
    assert everything["count"] >= 1
    assert all(i["run_id"] == run_id for i in everything["incidents"])
    crit = http.get("/v1/incidents", params={"project": project, "severity": "critical", "status": "open"}).json()
    assert [i["signature"] for i in crit["incidents"]] == ["nonfinite"]
    assert http.get("/v1/incidents", params={"project": project, "status": "resolved"}).json()["count"] == 0
    assert http.get("/v1/incidents", params={"run_id": run_id}).json()["count"] == everything["count"]
    assert http.get("/v1/incidents", params={"status": "closed"}).status_code == 422


def test_an_incident_opened_and_resolved_within_one_batch_still_reaches_the_job(http: httpx.Client) -> None:
    run_id = _run(http, ["a", "b", "c"])
    _post(http, run_id, [_healthy(i) for i in range(40)])
    quiet = detect.DetectorConfig().resolve_after_steps
    steps = [_healthy(i) for i in range(40, 42 + quiet)]
    steps[0]["grad_norm"] = "Infinity"
    out = _post(http, run_id, steps)
    assert out["open_incidents"] == []  # resolved by the end of the batch ...
    (raised,) = out["raised_incidents"]  # ... but the job still hears of it
    assert (raised["signature"], raised["status"], raised["opened_step"]) == ("nonfinite", "resolved", 40)
    assert _post(http, run_id, [_healthy(42 + quiet)])["raised_incidents"] == []


def test_the_demos_exploding_run_keeps_its_incident_open_to_the_end(http: httpx.Client) -> None:
    """Real torch training (examples/train_tiny.py --explode, as `make demo` runs it): its loss climbs to 1e12
    and then NaN. Its incident must not resolve on the way (the bands would have learnt the exploded level, and
    the incident list would tell a reader the run recovered): it is closed by the run finishing, at its last
    step, and it holds every signature of the explosion."""
    pytest.importorskip("torch")
    project = new_run_id("demo")
    subprocess.run([sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--explode", "--quiet", "--steps",
                    "300", "--project", project, "--url", str(http.base_url).rstrip("/")],
                   check=True, timeout=300, capture_output=True)
    (incident,) = http.get("/v1/incidents", params={"project": project, "limit": 1000}).json()["incidents"]
    run = http.get(f"/v1/runs/{incident['run_id']}").json()
    assert {"grad_growth", "loss_divergence", "nonfinite"} <= {e["signature"] for e in incident["evidence"]["timeline"]}
    assert incident["severity"] == "critical"
    assert (incident["status"], incident["resolved_step"]) == ("resolved", run["last_step"])
    assert incident["evidence"]["resolved"] == {"reason": "run finished", "step": run["last_step"]}


@pytest.mark.parametrize("spelled", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_measurement_is_the_incidents_value_not_null(http: httpx.Client, spelled: str) -> None:
    """NaN is data: the incident's value is the measurement, spelled as on the wire, on both databases."""
    run_id = _run(http, ["a", "b", "c"])
    _post(http, run_id, [_healthy(i) for i in range(40)])
    bad = {**_healthy(40), "grad_norm": spelled}
    (raised,) = _post(http, run_id, [bad])["open_incidents"]
    listed = http.get("/v1/incidents", params={"run_id": run_id}).json()["incidents"]
    for inc in (raised, *listed, *http.get(f"/v1/runs/{run_id}/incidents").json()["incidents"]):
        assert (inc["signature"], inc["value"], inc["evidence"]["opened"]["values"]["grad_norm"]) == (
            "nonfinite", spelled, spelled)
