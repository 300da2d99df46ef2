"""Binary step batches over HTTP (docs/wire.md), against a real uvicorn server, on SQLite and on PostgreSQL:
the same results as JSON, the same idempotency, and a precise 422 for every malformed body, never a 5xx."""

from __future__ import annotations

import gzip
import json
import struct
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.wire import BINARY_CONTENT_TYPE, BINARY_MAGIC, MISSING_BITS, encode_binary_batch

from ..support.binary import decode_binary_batch
from ..support.databases import SERVER_MAX_BODY_BYTES, new_run_id
from ..support.serverproc import ServerProcess

BINARY = {"content-type": BINARY_CONTENT_TYPE}
LAYERS = ["a", "b", "c"]



def _run(http: httpx.Client, layers: list[str] | None = None) -> str:
    run_id = new_run_id()
    assert http.put(f"/v1/runs/{run_id}", json={"layers": layers}).status_code == 201
    return run_id


def _post(http: httpx.Client, run_id: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return http.post(f"/v1/runs/{run_id}/steps", content=body, headers=headers or BINARY)


def _stored(http: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    return http.get(f"/v1/runs/{run_id}/steps").json()["steps"]  # type: ignore[no-any-return]


def _frame(header: dict[str, Any], *sections: bytes) -> bytes:
    head = json.dumps(header).encode()
    return BINARY_MAGIC + struct.pack("<I", len(head)) + head + b"".join(sections)


def _f64(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def _bits(*patterns: int) -> bytes:
    return struct.pack(f"<{len(patterns)}Q", *patterns)


STEPS = [
    {"step": 0, "time": 1764000000.5, "loss": "NaN", "grad_norm": "Infinity", "lr": "-Infinity", "update_norm": 1e-300,
     "layer_grad_norms": ["NaN", "Infinity", 0.1], "layer_weight_norms": [None, "-Infinity", 5e-324],
     "layer_update_norms": [0.0, -0.0, 1.7976931348623157e308], "scalars": {"acc": "NaN"}, "skipped": True},
    {"step": 1, "time": 1764000001.25, "loss": 2.5, "layer_grad_norms": [1.0, 2.0, 3.0]},
    {"step": 2, "time": 1764000002.0, "grad_norm": 0.1 + 0.2, "skipped": False},
]


def test_binary_batch_round_trips_exactly_like_json(http: httpx.Client) -> None:
    via_binary, via_json = _run(http, LAYERS), _run(http, LAYERS)
    body = {"batch_id": "b1", "layers": LAYERS, "steps": STEPS}
    r = _post(http, via_binary, encode_binary_batch(body))
    assert r.status_code == 200, r.text
    assert (r.json()["accepted"], r.json()["duplicates"], r.json()["last_step"]) == (3, 0, 2)
    assert http.post(f"/v1/runs/{via_json}/steps", json=body).status_code == 200
    got = _stored(http, via_binary)
    assert got == _stored(http, via_json)
    assert got[0] == {**STEPS[0], "late": False}
    assert got[1]["layer_weight_norms"] is None and got[1]["loss"] == 2.5 and got[2]["grad_norm"] == 0.1 + 0.2
    assert [s["skipped"] for s in got] == [True, False, False]


def test_resends_are_duplicates_whichever_wire_and_a_changed_one_is_409(http: httpx.Client) -> None:
    run_id = _run(http, LAYERS)
    body = {"layers": LAYERS, "steps": STEPS}
    assert _post(http, run_id, encode_binary_batch(body)).json()["accepted"] == 3
    again = _post(http, run_id, encode_binary_batch(body)).json()
    assert (again["accepted"], again["duplicates"]) == (0, 3)
    as_json = http.post(f"/v1/runs/{run_id}/steps", json=body).json()
    assert (as_json["accepted"], as_json["duplicates"]) == (0, 3)
    changed = {"layers": LAYERS, "steps": [{"step": 3, "loss": 1.0}, {**STEPS[1], "loss": 99.0}]}
    r = _post(http, run_id, encode_binary_batch(changed))
    assert r.status_code == 409 and r.json()["detail"]["steps"] == [1]
    assert http.get(f"/v1/runs/{run_id}").json()["n_steps"] == 3


def test_out_of_order_repeated_and_reordered_layers_take_the_general_path(http: httpx.Client) -> None:
    run_id = _run(http, LAYERS)
    steps = [{"step": 5, "loss": 0.5}, {"step": 2, "loss": 0.2}, {"step": 5, "loss": 0.5}]
    r = _post(http, run_id, encode_binary_batch({"steps": steps})).json()
    assert (r["accepted"], r["duplicates"], r["last_step"]) == (2, 1, 5)
    late = _post(http, run_id, encode_binary_batch({"steps": [{"step": 3, "loss": 0.3}]})).json()
    assert late["accepted"] == 1 and [s["late"] for s in _stored(http, run_id)] == [False, True, False]
    # the batch names its layers in another order, plus a new one: values land on the right layers
    reordered = {"layers": ["c", "a", "d"], "steps": [{"step": 6, "layer_grad_norms": [3.0, 1.0, 4.0]}]}
    assert _post(http, run_id, encode_binary_batch(reordered)).status_code == 200
    assert http.get(f"/v1/runs/{run_id}").json()["layers"] == ["a", "b", "c", "d"]
    assert _stored(http, run_id)[-1]["layer_grad_norms"] == [1.0, None, 3.0, 4.0]


def test_nan_bit_patterns_are_nan_and_only_the_sentinel_is_not_measured(http: httpx.Client) -> None:
    run_id = _run(http, ["a", "b", "c", "d"])
    odd_nans = (0xFFF8_0000_0000_0000, 0x7FF0_0000_0000_0001, 0xFFF8_0000_DEAD_0001)  # -NaN, signalling, -sentinel
    body = _frame({"n": 1, "fields": ["step", "loss", "layer_grad_norms"], "layers": ["a", "b", "c", "d"]},
                  struct.pack("<q", 7), _bits(odd_nans[0]), _bits(MISSING_BITS, *odd_nans[1:], 0x7FF0_0000_0000_0000))
    assert _post(http, run_id, body).status_code == 200
    got = _stored(http, run_id)[0]
    assert got["loss"] == "NaN" and got["layer_grad_norms"] == [None, "NaN", "NaN", "Infinity"]
    sentinel_loss = _frame({"n": 1, "fields": ["step", "loss"]}, struct.pack("<q", 8), _bits(MISSING_BITS))
    assert _post(http, run_id, sentinel_loss).status_code == 200
    assert _stored(http, run_id)[1]["loss"] is None


def test_gzip_binary_is_accepted_and_caps_hold(http: httpx.Client) -> None:
    run_id = _run(http, LAYERS)
    body = encode_binary_batch({"layers": LAYERS, "steps": STEPS})
    r = _post(http, run_id, gzip.compress(body), {**BINARY, "content-encoding": "gzip"})
    assert r.status_code == 200 and r.json()["accepted"] == 3
    big = _frame({"n": SERVER_MAX_BODY_BYTES // 8, "fields": ["step"]}, b"\0" * SERVER_MAX_BODY_BYTES)
    assert _post(http, run_id, big).status_code == 413
    bomb = gzip.compress(big, compresslevel=9)
    r = _post(http, run_id, bomb, {**BINARY, "content-encoding": "gzip"})
    assert r.status_code == 413 and "decompressed" in r.json()["detail"]


VALID_HEAD = {"n": 2, "fields": ["step", "loss"]}
TWO_STEPS = struct.pack("<2q", 0, 1)


@pytest.mark.parametrize(("body", "loc", "msg"), [
    (b"", ["body"], "starts with"),
    (b"GWS2" + b"\0" * 8, ["body"], "starts with"),
    (BINARY_MAGIC + struct.pack("<I", 1000) + b"{}", ["body", "header"], "runs past"),
    (BINARY_MAGIC + struct.pack("<I", 3) + b"{x}", ["body", "header"], "not JSON"),
    (BINARY_MAGIC + struct.pack("<I", 2) + b"\xff\xfe", ["body", "header"], "not JSON"),
    (_frame([1, 2]), ["body", "header"], "object"),  # type: ignore[arg-type]
    (BINARY_MAGIC + struct.pack("<I", 200_000) + b"[" * 200_000, ["body", "header"], "not JSON"),  # deep nesting
    (BINARY_MAGIC + struct.pack("<I", 30) + b'{"n": NaN, "fields": ["step"]}', ["body", "header"], "JSON"),
    (_frame({"n": -1, "fields": ["step"]}), ["body", "header", "n"], "integer"),
    (_frame({"n": 1.0, "fields": ["step"]}, _f64(0)), ["body", "header", "n"], "integer"),
    (_frame({"n": 2**40, "fields": ["step"]}, TWO_STEPS), ["body", "step"], "needs"),  # more than the body holds
    (_frame({"n": 2, "fields": ["loss"]}, _f64(1, 2)), ["body", "header", "fields"], "'step'"),
    (_frame({"n": 2, "fields": ["step", "colour"]}, TWO_STEPS), ["body", "header", "fields"], "colour"),
    (_frame({"n": 2, "fields": ["step", "step"]}, TWO_STEPS, TWO_STEPS), ["body", "header", "fields"], "once"),
    (_frame({"n": 2, "fields": ["step", "layer_grad_norms"]}, TWO_STEPS, _f64(1, 2)), ["body", "header", "layers"],
     "layers"),
    (_frame(VALID_HEAD, TWO_STEPS, _f64(1.0)), ["body", "loss"], "needs 16 bytes"),
    (_frame(VALID_HEAD, TWO_STEPS), ["body", "loss"], "needs 16 bytes"),
    (_frame(VALID_HEAD, TWO_STEPS, _f64(1, 2), b"\0"), ["body"], "after the last section"),
    (_frame({"n": 2, "fields": ["step"], "colour": 1}, TWO_STEPS), ["body", "header", "colour"], "Extra inputs"),
    (_frame({"n": 2, "fields": ["step"], "batch_id": 5}, TWO_STEPS), ["body", "header", "batch_id"], "string"),
    (_frame({"n": 2, "fields": ["step"], "layers": ["a", "a"]}, TWO_STEPS), ["body", "header", "layers"], "unique"),
    (_frame({"n": 2, "fields": ["step"], "layers": ["a\u0000"]}, TWO_STEPS), ["body", "header", "layers", 0], "NUL"),
    (_frame({"n": 2, "fields": ["step"], "scalars": [None]}, TWO_STEPS), ["body", "header", "scalars"], "2 steps"),
    (_frame({"n": 2, "fields": ["step"], "scalars": [{"acc": "lots"}, None]}, TWO_STEPS),
     ["body", "header", "scalars", 0, "acc"], "number"),
    (_frame({"n": 2, "fields": ["step"]}, struct.pack("<2q", 0, -1)), ["body", "steps", 1, "step"], "not in"),
    (_frame({"n": 1, "fields": ["step"]}, struct.pack("<q", 2**62 + 1)), ["body", "steps", 0, "step"], "not in"),
    (_frame({"n": 2, "fields": ["step", "time"]}, TWO_STEPS, _f64(1.0, float("nan"))), ["body", "steps", 1, "time"],
     "finite"),
    (_frame({"n": 2, "fields": ["step", "time"]}, TWO_STEPS, _f64(float("-inf"), 1.0)), ["body", "steps", 0, "time"],
     "finite"),
    (_frame({"n": 2, "fields": ["step", "skipped"]}, TWO_STEPS, b"\x01\x02"), ["body", "steps", 1, "skipped"],
     "0 or 1"),
])
def test_malformed_binary_bodies_are_422_naming_where(http: httpx.Client, body: bytes, loc: list, msg: str) -> None:
    run_id = _run(http, LAYERS)
    r = _post(http, run_id, body)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"][: len(loc)] == loc and msg.lower() in e["msg"].lower() for e in errors), errors
    assert http.get(f"/v1/runs/{run_id}").json()["n_steps"] == 0


def test_binary_batch_over_the_step_cap_is_413_naming_it(http: httpx.Client, server: ServerProcess) -> None:
    run_id = _run(http)
    n = 20_001  # the session servers keep the default GRADWATCH_MAX_BATCH_STEPS, 20000
    r = _post(http, run_id, _frame({"n": n, "fields": ["step"]}, struct.pack(f"<{n}q", *range(n))))
    assert r.status_code == 413, r.text
    assert "the batch has 20001 steps; the limit is 20000 steps (GRADWATCH_MAX_BATCH_STEPS)" in r.text


def test_json_is_still_refused_a_binary_content_type_on_runs(http: httpx.Client) -> None:
    r = http.put(f"/v1/runs/{new_run_id()}", content=b"{}", headers=BINARY)
    assert r.status_code == 415


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """A valid binary batch, then cut short, extended, or with bytes overwritten anywhere (header included)."""
    n = draw(st.integers(0, 5))
    values = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
    steps = [{"step": i, "loss": draw(values), "layer_grad_norms": [draw(values) for _ in LAYERS]} for i in range(n)]
    body = bytearray(encode_binary_batch({"layers": LAYERS, "steps": steps}))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["cut", "grow", "poke"]))
        if kind == "cut":
            del body[draw(st.integers(0, len(body))):]
        elif kind == "grow":
            body += draw(st.binary(min_size=1, max_size=16))
        elif body:
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
    return bytes(body)


def test_mangled_binary_bodies_never_cause_a_server_error(http: httpx.Client) -> None:
    run_id = _run(http, LAYERS)

    @given(body=mangled())
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(body: bytes) -> None:
        r = _post(http, run_id, body)
        assert r.status_code in (200, 409, 422), (r.status_code, r.text[:300])
        if r.status_code == 200:  # what was accepted (or found identical) is what the body says
            sent = {s["step"]: s for s in decode_binary_batch(body)["steps"]}
            stored = {s["step"]: s for s in _stored(http, run_id) if s["step"] in sent}
            assert stored.keys() == sent.keys()
            for step, values in sent.items():  # time is not compared: a resend need not repeat it
                assert {k: stored[step][k] for k in values if k != "time"} == \
                    {k: v for k, v in values.items() if k != "time"}, step

    check()
