"""pg_arrays: double precision[] written from numpy in the binary protocol and read back from array_send's bytes,
through a real PostgreSQL, against psycopg's own text form of the same arrays."""

from __future__ import annotations

import math

import numpy as np
import psycopg

from gradwatch_service.storage.pg_arrays import float8_arrays, float8_matrix

from ..support.databases import POSTGRES_ADMIN_URL, require_postgres


def test_arrays_round_trip_exactly_with_nulls_nonfinite_and_null_rows() -> None:
    require_postgres()
    values = np.array([[1.5, -0.0, 5e-324], [math.nan, math.inf, -math.inf], [2.0, 3.0, 4.0], [7.0, 8.0, 9.0]])
    null = np.array([[False, False, False], [False, False, True], [False, False, False], [True, True, True]])
    present = np.array([True, True, False, True])
    arrays = float8_arrays(values, null, present)
    with psycopg.connect(POSTGRES_ADMIN_URL.replace("postgresql+psycopg", "postgresql")) as conn:
        conn.execute("CREATE TEMP TABLE a (i int, v double precision[])")
        for i, a in enumerate(arrays):
            conn.execute("INSERT INTO a VALUES (%s, %b)", (i, a))
        conn.execute("INSERT INTO a VALUES (4, ARRAY[0.25]::float8[])")  # shorter than the matrix
        rows = conn.execute("SELECT v, array_send(v) FROM a ORDER BY i").fetchall()
    text_form = [r[0] for r in rows]
    assert text_form[:4] == [[1.5, -0.0, 5e-324], [text_form[1][0], math.inf, None], None, [None, None, None]]
    assert math.isnan(text_form[1][0]) and math.copysign(1.0, text_form[0][1]) == -1.0
    got, got_null = float8_matrix([r[1] for r in rows], 3)
    want_null = np.vstack([null | ~present[:, None], [[False, True, True]]])
    assert (got_null == want_null).all()
    want = np.vstack([np.where(want_null[:4], np.nan, values), [[0.25, np.nan, np.nan]]])
    assert np.array_equal(got.view("<u8")[~want_null], want.view("<u8")[~want_null])  # bit for bit, -0.0 too
