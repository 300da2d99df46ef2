"""Value encodings: wire strings and SQLite's 'NaN' text keep NaN, ±Infinity and "not measured" apart (the
float64 column SQLite stores per-layer arrays in is gradwatch.wire's: tests/client/test_wire.py)."""

from __future__ import annotations

import math

import pytest

from gradwatch.wire import decode_value, encode_value
from gradwatch_service.codec import sqlite_real_in, sqlite_real_out
from gradwatch_service.downsample import downsample_minmax


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


def test_downsample_keeps_the_spike_and_every_kind_of_nonfinite() -> None:
    steps = list(range(1000))
    values: list[float | None] = [1.0 + (i % 7) * 0.01 for i in steps]
    values[333] = 1e6
    values[500] = math.nan
    values[501] = math.inf
    values[502] = -math.inf
    s, v = downsample_minmax(steps, values, 50)
    kept = dict(zip(s, v, strict=True))
    assert kept[333] == 1e6
    assert math.isnan(kept[500]) and kept[501] == math.inf and kept[502] == -math.inf  # type: ignore[arg-type]
    finite = [x for x in v if x is not None and math.isfinite(x)]
    assert len(finite) <= 50
    assert s == sorted(s)


def test_downsample_returns_short_series_unchanged() -> None:
    assert downsample_minmax([1, 2, 3], [1.0, None, 3.0], 10) == ([1, 2, 3], [1.0, None, 3.0])
