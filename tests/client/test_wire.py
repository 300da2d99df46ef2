"""gradwatch.wire, the contract, in process: binary step batches, float64 columns, free-form JSON, run ids (the
HTTP side: tests/service/test_api_binary.py)."""

from __future__ import annotations

import math
import re
import struct

import pytest

from gradwatch.wire import (
    BINARY_MAGIC,
    MISSING_BITS,
    RUN_ID_PATTERN,
    BinaryBodyError,
    encode_binary_batch,
    jsonable,
    pack_floats,
    split_binary_batch,
    unpack_floats,
)

from ..support.binary import decode_binary_batch


def test_a_batch_survives_encoding_with_every_kind_of_value() -> None:
    body = {"batch_id": "b", "layers": ["a", "b"], "steps": [
        {"step": 0, "time": 1.5, "loss": "NaN", "grad_norm": "Infinity", "lr": "-Infinity", "update_norm": -0.0,
         "layer_grad_norms": [None, 5e-324], "scalars": {"acc": "NaN"}, "skipped": True},
        {"step": 2**62, "time": 2.5, "layer_weight_norms": ["NaN", 1.0]},
    ]}
    assert decode_binary_batch(encode_binary_batch(body)) == {
        "batch_id": "b", "layers": ["a", "b"], "steps": [
            {**body["steps"][0]},
            {**body["steps"][1], "skipped": False},
        ]}


def test_only_the_columns_some_step_carries_are_sent() -> None:
    header, sections = split_binary_batch(encode_binary_batch({"steps": [{"step": 1, "loss": 0.5}, {"step": 2}]}))
    assert header == {"n": 2, "fields": ["step", "loss"]}
    assert struct.unpack("<2Q", sections["loss"])[1] == MISSING_BITS


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


def test_a_float_column_keeps_nan_infinity_signed_zero_and_not_measured_apart() -> None:
    values = [1.0, math.nan, math.inf, -math.inf, None, -0.0, 2.5e-310]
    column = pack_floats(values)
    assert len(column) == 8 * len(values)
    assert column[32:40] == struct.pack("<Q", MISSING_BITS)
    back = unpack_floats(column)
    assert all(_same(a, b) for a, b in zip(back, values, strict=True)), back


def test_only_the_aligned_sentinel_is_not_measured() -> None:
    other_nan = struct.pack("<Q", MISSING_BITS ^ 1)  # a NaN with another payload is a value
    sentinel = struct.pack("<Q", MISSING_BITS)
    straddling = struct.pack("<d", 1.0)[:4] + sentinel + struct.pack("<d", 2.0)[4:]  # the bytes, not aligned
    back = unpack_floats(other_nan + sentinel + straddling)
    assert math.isnan(back[0]) and back[1] is None  # type: ignore[arg-type]
    assert None not in back[2:] and len(back) == 4


def test_jsonable_names_nonfinite_floats_and_stringifies_what_json_cannot_hold() -> None:
    assert jsonable({"lr": math.inf, 3: (math.nan, -math.inf, 1), "ok": [True, None, "x"], "obj": object}) == {
        "lr": "Infinity", "3": ["NaN", "-Infinity", 1], "ok": [True, None, "x"], "obj": str(object)}


@pytest.mark.parametrize(("run_id", "ok"), [("r1", True), ("a" * 128, True), ("A.b_c:d-9", True), ("", False),
                                            ("-r", False), ("a" * 129, False), ("a b", False), ("a/b", False)])
def test_run_ids_are_url_safe_and_bounded(run_id: str, ok: bool) -> None:
    assert bool(re.fullmatch(RUN_ID_PATTERN, run_id)) is ok


def test_rows_must_match_the_layers() -> None:
    with pytest.raises(ValueError, match="one value per layer"):
        encode_binary_batch({"layers": ["a"], "steps": [{"step": 0, "layer_grad_norms": [1.0, 2.0]}]})


@pytest.mark.parametrize("raw", [b"", BINARY_MAGIC, BINARY_MAGIC + struct.pack("<I", 99) + b"{}",
                                 encode_binary_batch({"steps": [{"step": 0}]})[:-1],
                                 encode_binary_batch({"steps": [{"step": 0}]}) + b"\0"])
def test_framing_errors_are_binary_body_errors(raw: bytes) -> None:
    with pytest.raises(BinaryBodyError):
        split_binary_batch(raw)
