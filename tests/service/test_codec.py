"""Value encodings: wire strings and SQLite's 'NaN' text keep NaN, ±Infinity and "not measured" apart (the
float64 column SQLite stores per-layer arrays in is gradwatch.wire's: tests/client/test_wire.py)."""

from __future__ import annotations

import math

import pytest

from gradwatch.wire import decode_value, encode_value
from gradwatch_service.storage.dialect import sqlite_real_in, sqlite_real_out


def same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("x", [0.0, -0.0, 1.5, 1e308, -1e-308, 5e-324, math.inf, -math.inf, math.nan, None])
def test_wire_value_round_trip(x: float | None) -> None:
    assert same(decode_value(encode_value(x)), x)


def test_wire_names_nonfinite_values_as_the_protobuf_json_strings() -> None:
    assert [encode_value(v) for v in (math.nan, math.inf, -math.inf)] == ["NaN", "Infinity", "-Infinity"]


@pytest.mark.parametrize("bad", ["nan", "inf", "1.5", True, [], {}])
def test_wire_rejects_what_is_not_a_value(bad: object) -> None:
    with pytest.raises(ValueError):
        decode_value(bad)


def test_sqlite_scalar_encoding_keeps_nan_out_of_null() -> None:
    assert sqlite_real_in(math.nan) == "NaN"
    assert math.isnan(sqlite_real_out("NaN"))  # type: ignore[arg-type]
    assert sqlite_real_in(None) is None and sqlite_real_out(None) is None
    assert sqlite_real_in(math.inf) == math.inf
