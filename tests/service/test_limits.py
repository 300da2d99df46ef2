"""Every input limit (limits.py, settings.py) on a real server with small limits, on SQLite and on PostgreSQL, over
both step wires: going over one is a 413 or 422 that names it and its setting, the whole request is refused, and
what earlier requests stored stays."""

from __future__ import annotations

import gzip
import inspect
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

import gradwatch
from gradwatch.wire import BINARY_CONTENT_TYPE, encode_binary_batch
from gradwatch_service.alerting.schemas import SubscriptionCreate
from gradwatch_service.alerting.subscriptions import count_subscriptions, create_subscription
from gradwatch_service.storage.db import write_transaction

from ..support.databases import BACKENDS, SERVER_MAX_BODY_BYTES, new_database_url, new_run_id
from ..support.serverproc import ServerProcess

AUTH: dict[str, Any] = {"auth": True} if "auth" in inspect.signature(ServerProcess).parameters else {}
"""An admin token and its header (`ServerProcess.headers`) where the servers have access control."""

LIMITS = {
    "GRADWATCH_MAX_BODY_BYTES": "4096",
    "GRADWATCH_MAX_BATCH_STEPS": "5",
    "GRADWATCH_MAX_RUN_LAYERS": "4",
    "GRADWATCH_MAX_LAYER_NAME_CHARS": "8",
    "GRADWATCH_MAX_RUN_NAME_CHARS": "10",
    "GRADWATCH_MAX_CONFIG_BYTES": "256",
    "GRADWATCH_MAX_STEP_SCALARS": "2",
    "GRADWATCH_MAX_SCALAR_NAME_CHARS": "5",
    "GRADWATCH_MAX_WEBHOOK_SUBSCRIPTIONS": "2",
    "GRADWATCH_MAX_WEBHOOK_URL_CHARS": "40",
    "GRADWATCH_MAX_WEBHOOK_NAME_CHARS": "6",
}


@pytest.fixture(scope="module", params=BACKENDS)
def limited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A server of this module's own with the small limits above, on each backend."""
    tmp = tmp_path_factory.mktemp(f"limits-{request.param}")
    url, schema = new_database_url(request.param, tmp)
    proc = ServerProcess(url, env={**LIMITS, "GRADWATCH_WEBHOOK_DELIVERY": "false"}, log_path=tmp / "server.log",
                         **AUTH)
    proc.start()
    try:
        with httpx.Client(base_url=proc.url, timeout=60, headers=getattr(proc, "headers", {})) as client:
            yield client
    finally:
        proc.stop()
        if schema:
            schema.drop()


def _refused(r: httpx.Response, status: int, setting: str, message: str) -> dict[str, Any]:
    """The answer names the limit and the setting, in the message and as fields."""
    assert r.status_code == status, r.text
    errors = r.json()["detail"]
    assert isinstance(errors, list), errors
    error = errors[0]
    assert error["setting"] == setting and error["type"] == "limit_exceeded", error
    assert str(error["limit"]) == LIMITS[setting] and f"({setting})" in error["msg"], error
    assert message in error["msg"], error
    return error  # type: ignore[no-any-return]


# -------------------------------------------------------------------------------------------------------- runs

@pytest.mark.parametrize(("body", "at_the_limit", "setting", "loc", "message"), [
    ({"name": "n" * 11}, {"name": "n" * 10}, "GRADWATCH_MAX_RUN_NAME_CHARS", ["body", "name"],
     "name is 11 characters; the limit is 10 characters"),
    ({"config": {"k": "v" * 251}}, {"config": {"k": "v" * 248}}, "GRADWATCH_MAX_CONFIG_BYTES", ["body", "config"],
     "config is 259 bytes of JSON; the limit is 256 bytes of JSON"),
    ({"meta": {"host": "é" * 125}}, {"meta": {"host": "é" * 122}}, "GRADWATCH_MAX_CONFIG_BYTES", ["body", "meta"],
     "meta is 261 bytes"),  # bytes, not characters
    ({"layers": list("abcde")}, {"layers": list("abcd")}, "GRADWATCH_MAX_RUN_LAYERS", ["body", "layers"],
     "the list has 5 layers; the limit is 4 layers"),
    ({"layers": ["a", "ninechars"]}, {"layers": ["a", "eightchr"]}, "GRADWATCH_MAX_LAYER_NAME_CHARS",
     ["body", "layers", 1], "the layer name is 9 characters"),
])
def test_a_run_over_a_limit_is_refused_whole(limited: httpx.Client, body: dict[str, Any],
                                             at_the_limit: dict[str, Any], setting: str, loc: list[Any],
                                             message: str) -> None:
    run_id = new_run_id()
    error = _refused(limited.put(f"/v1/runs/{run_id}", json={"project": "lim", **body}), 422, setting, message)
    assert error["loc"] == loc
    assert limited.get(f"/v1/runs/{run_id}").status_code == 404  # nothing of it was created
    assert limited.put(f"/v1/runs/{run_id}", json=at_the_limit).status_code == 201
    assert limited.put(f"/v1/runs/{run_id}", json=body).status_code == 422  # an update is held to it too


def test_layers_appended_over_puts_and_batches_are_held_to_the_run_limit(limited: httpx.Client) -> None:
    run_id = new_run_id()
    assert limited.put(f"/v1/runs/{run_id}", json={"layers": ["a", "b", "c"]}).status_code == 201
    _refused(limited.put(f"/v1/runs/{run_id}", json={"layers": list("abcde")}), 422, "GRADWATCH_MAX_RUN_LAYERS",
             "the list has 5 layers")
    # each body is within the limit; the run would not be
    assert limited.post(f"/v1/runs/{run_id}/steps", json={"steps": [{"step": 0, "loss": 1.0}]}).status_code == 200
    r = limited.post(f"/v1/runs/{run_id}/steps", json={"layers": ["x", "y"], "steps": [{"step": 1, "loss": 2.0}]})
    _refused(r, 422, "GRADWATCH_MAX_RUN_LAYERS", "the run would have 5 layers; the limit is 4 layers")
    binary = encode_binary_batch({"layers": ["e", "f"], "steps": [{"step": 1}]})
    r = limited.post(f"/v1/runs/{run_id}/steps", content=binary, headers={"content-type": BINARY_CONTENT_TYPE})
    _refused(r, 422, "GRADWATCH_MAX_RUN_LAYERS", "the run would have 5 layers")
    run = limited.get(f"/v1/runs/{run_id}").json()
    assert (run["layers"], run["n_steps"]) == (["a", "b", "c"], 1)  # the earlier batch stays, no layer was added
    assert limited.put(f"/v1/runs/{run_id}", json={"layers": ["a", "b", "c", "d"]}).status_code == 200


# ------------------------------------------------------------------------------------------------------- steps

def _post(http: httpx.Client, run_id: str, wire: str, body: dict[str, Any]) -> httpx.Response:
    if wire == "json":
        return http.post(f"/v1/runs/{run_id}/steps", json=body)
    return http.post(f"/v1/runs/{run_id}/steps", content=encode_binary_batch(body),
                     headers={"content-type": BINARY_CONTENT_TYPE})


@pytest.mark.parametrize("wire", ["json", "binary"])
@pytest.mark.parametrize(("body", "status", "setting", "loc", "message"), [
    ({"steps": [{"step": i, "loss": 1.0} for i in range(10, 16)]}, 413, "GRADWATCH_MAX_BATCH_STEPS",
     ["body", "steps"], "the batch has 6 steps; the limit is 5 steps"),
    ({"steps": [{"step": 10, "scalars": {"a": 1.0, "b": 2.0, "c": "NaN"}}]}, 422, "GRADWATCH_MAX_STEP_SCALARS",
     ["body", "steps", 0, "scalars"], "the step has 3 extra scalars; the limit is 2 extra scalars"),
    ({"steps": [{"step": 10}, {"step": 11, "scalars": {"sixsix": 1.0}}]}, 422, "GRADWATCH_MAX_SCALAR_NAME_CHARS",
     ["body", "steps", 1, "scalars", "sixsix"], "the scalar name is 6 characters"),
    ({"layers": list("abcde"), "steps": [{"step": 10}]}, 422, "GRADWATCH_MAX_RUN_LAYERS", ["body", "layers"],
     "the list has 5 layers"),
    ({"layers": ["ninechars"], "steps": [{"step": 10}]}, 422, "GRADWATCH_MAX_LAYER_NAME_CHARS",
     ["body", "layers", 0], "the layer name is 9 characters"),
])
def test_a_batch_over_a_limit_is_refused_whole_on_both_wires(limited: httpx.Client, wire: str, body: dict[str, Any],
                                                            status: int, setting: str, loc: list[Any],
                                                            message: str) -> None:
    run_id = new_run_id()
    assert limited.put(f"/v1/runs/{run_id}", json={"layers": ["a"]}).status_code == 201
    earlier = _post(limited, run_id, wire, {"steps": [{"step": 0, "loss": 1.0, "scalars": {"a": 1.0, "b": 2.0}}]})
    assert earlier.status_code == 200 and earlier.json()["accepted"] == 1, earlier.text
    error = _refused(_post(limited, run_id, wire, body), status, setting, message)
    assert error["loc"] == loc
    run = limited.get(f"/v1/runs/{run_id}").json()
    assert (run["n_steps"], run["last_step"], run["layers"]) == (1, 0, ["a"])


def test_the_body_cap_names_its_setting_on_the_wire_and_inflated(limited: httpx.Client) -> None:
    run_id = new_run_id()
    assert limited.put(f"/v1/runs/{run_id}", json={}).status_code == 201
    big = b'{"steps": [], "batch_id": "' + b"x" * 5000 + b'"}'
    for body, headers, said in ((big, {}, "request body is 5"), (gzip.compress(big), {"content-encoding": "gzip"},
                                                                 "decompressed request body is over 4096 bytes")):
        r = limited.post(f"/v1/runs/{run_id}/steps", content=body, headers={"content-type": "application/json",
                                                                          **headers})
        assert r.status_code == 413 and said in r.json()["detail"], r.text
        assert "(GRADWATCH_MAX_BODY_BYTES)" in r.json()["detail"]


def test_the_client_sends_a_batch_over_the_step_limit_in_halves_and_loses_nothing(limited: httpx.Client,
                                                                                  tmp_path: Path) -> None:
    token = dict(limited.headers).get("authorization", "").removeprefix("Bearer ") or None
    run = gradwatch.init(url=str(limited.base_url), token=token, project="lim", spool_dir=tmp_path, batch_size=12,
                         batch_age=30.0)
    for step in range(12):
        run.log(step, loss=1.0 / (step + 1), grad_norm=float("nan") if step == 7 else 1.0)
    report = run.finish(timeout=20)
    assert report.lost == {} and report.delivered == 12, report
    assert limited.get(f"/v1/runs/{run.run_id}").json()["n_steps"] == 12


def test_the_defaults_hold_on_the_session_servers(http: httpx.Client) -> None:
    """The session servers keep every default but the body cap (tests/support/databases.py)."""
    run_id = new_run_id()
    r = http.put(f"/v1/runs/{run_id}", json={"name": "n" * 257})
    assert r.status_code == 422 and "(GRADWATCH_MAX_RUN_NAME_CHARS)" in r.text and "limit is 256" in r.text
    r = http.put(f"/v1/runs/{run_id}", json={"config": {"k": "v" * 65_529}})
    assert r.status_code == 422 and "config is 65537 bytes of JSON; the limit is 65536" in r.text
    assert http.put(f"/v1/runs/{run_id}", json={"config": {"k": "v" * 65_528}}).status_code == 201
    scalars = {f"s{i}": float(i) for i in range(101)}
    r = http.post(f"/v1/runs/{run_id}/steps", json={"steps": [{"step": 0, "scalars": scalars}]})
    assert r.status_code == 422 and "101 extra scalars; the limit is 100" in r.text
    r = http.post(f"/v1/runs/{run_id}/steps", json={"steps": [{"step": 0, "scalars": {"x" * 129: 1.0}}]})
    assert r.status_code == 422 and "(GRADWATCH_MAX_SCALAR_NAME_CHARS)" in r.text
    layers = [f"layer{i}" for i in range(10_001)]
    assert len(str(layers)) < SERVER_MAX_BODY_BYTES
    r = http.put(f"/v1/runs/{run_id}", json={"layers": layers})
    assert r.status_code == 422 and "10001 layers; the limit is 10000" in r.text
    assert http.get(f"/v1/runs/{run_id}").json()["n_steps"] == 0


# ---------------------------------------------------------------------------------------------------- webhooks

def test_webhook_url_name_and_count_limits(limited: httpx.Client) -> None:
    url = "https://hooks.example.com/x"  # does not resolve here: allowed, and checked again at every delivery
    _refused(limited.post("/v1/webhooks", json={"url": url + "y" * 14}), 422, "GRADWATCH_MAX_WEBHOOK_URL_CHARS",
             "the URL is 41 characters; the limit is 40 characters")
    _refused(limited.post("/v1/webhooks", json={"url": url, "name": "sevenno"}), 422,
             "GRADWATCH_MAX_WEBHOOK_NAME_CHARS", "name is 7 characters")
    for sub in limited.get("/v1/webhooks").json()["subscriptions"]:
        limited.delete(f"/v1/webhooks/{sub['id']}")
    made = [limited.post("/v1/webhooks", json={"url": url, "enabled": False}) for _ in range(2)]
    assert [r.status_code for r in made] == [201, 201]
    error = _refused(limited.post("/v1/webhooks", json={"url": url}), 422, "GRADWATCH_MAX_WEBHOOK_SUBSCRIPTIONS",
                     "this would make 3 webhook subscriptions; the limit is 2")
    assert error["loc"] == ["body"]
    sub_id = made[0].json()["id"]
    _refused(limited.patch(f"/v1/webhooks/{sub_id}", json={"url": url + "y" * 14}), 422,
             "GRADWATCH_MAX_WEBHOOK_URL_CHARS", "the URL is 41")
    assert limited.get(f"/v1/webhooks/{sub_id}").json()["url"] == url
    assert limited.delete(f"/v1/webhooks/{sub_id}").status_code == 200
    assert limited.post("/v1/webhooks", json={"url": url, "enabled": False}).status_code == 201
    assert len(limited.get("/v1/webhooks").json()["subscriptions"]) == 2


def test_a_second_creator_waits_for_the_first_and_counts_its_subscription(engine: Engine) -> None:
    """The count under the limit is taken under a lock every creation takes (PostgreSQL: an advisory lock;
    SQLite: the write lock), so two creations at once cannot both see room for one more."""
    counted: list[int] = []

    def second() -> None:
        with write_transaction(engine) as conn:
            counted.append(count_subscriptions(conn))

    with write_transaction(engine) as conn:
        assert count_subscriptions(conn) == 0
        create_subscription(conn, SubscriptionCreate(url="https://hooks.example.com/race", enabled=False))
        other = threading.Thread(target=second)
        other.start()
        other.join(0.5)
        assert other.is_alive() and counted == []  # waiting for this transaction
    other.join(10)
    assert counted == [1]


def test_settings_document_the_limits_they_are_read_from(tmp_path: Path) -> None:
    from gradwatch_service.limits import InputLimits
    from gradwatch_service.settings import Settings

    limits = InputLimits.from_settings(Settings(**{k.removeprefix("GRADWATCH_").lower(): int(v)
                                                   for k, v in LIMITS.items()}))
    assert limits.max_step_scalars == 2 and limits.max_run_layers == 4
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    security = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    for field in ("max_body_bytes", *InputLimits.__dataclass_fields__):
        setting = f"GRADWATCH_{field.upper()}"
        assert f"`{setting}`" in readme and setting in security, setting
