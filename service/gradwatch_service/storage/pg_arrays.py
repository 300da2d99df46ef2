"""PostgreSQL `double precision[]` values in the binary protocol, built from numpy matrices a whole matrix at once.

psycopg dumps a Python list element by element in Python (about 0.1 ms for 50 floats), and parses a text array
back the same way; the rollups write tens of such arrays per row on every batch, and a heatmap reads thousands.
Here each row of a (k, C) matrix becomes array_send's bytes (a header, then per element its length, 8 or -1 for
NULL, and the big-endian float) in a few numpy operations, and a binary dumper hands them to the server as they
are; reads select `array_send(column)` and turn the bytes back into a matrix the same way. NaN and ±Infinity
are floats like any other, so they go both ways exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Float8Array", "float8_arrays", "float8_matrix"]

_FLOAT8, _FLOAT8_ARRAY = 701, 1022  # pg_type oids
_ELEMENT = np.dtype([("length", ">i4"), ("value", ">f8")])  # 12 bytes, unaligned, as on the wire


class Float8Array:
    """One `double precision[]` in binary form; bind it with the `%b` placeholder."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


def _register() -> None:
    """Teach psycopg to send a Float8Array. Connections copy the global adapters when they open, so this runs
    when the module is imported, before any; without the postgres extra there is nothing to teach."""
    try:
        import psycopg
        from psycopg.adapt import Dumper
        from psycopg.pq import Format
    except ImportError:
        return

    class Float8ArrayDumper(Dumper):
        format = Format.BINARY

        def __init__(self, cls: type, context: Any = None) -> None:
            super().__init__(cls, context)
            self.oid = _FLOAT8_ARRAY  # on the instance: a class oid would make this COPY's float8[] dumper too

        def dump(self, obj: Any) -> bytes:
            return obj.payload  # type: ignore[no-any-return]

    psycopg.adapters.register_dumper(Float8Array, Float8ArrayDumper)


_register()


def float8_arrays(values: npt.NDArray[np.float64], null: npt.NDArray[np.bool_] | None,
                  present: npt.NDArray[np.bool_] | None = None) -> list[Float8Array | None]:
    """Each row of `values` (k, C) as one array whose elements are NULL where `null` says; a row that `present`
    marks False is None (a NULL array). Rows without a NULL element are written side by side into one buffer
    and sliced from it, rows of NULL elements only are one constant (a healthy bucket's non-finite steps): only
    rows with some NULL elements are built one by one."""
    k, n_cols = values.shape
    out: list[Float8Array | None] = [None] * k
    wanted = np.ones(k, dtype=bool) if present is None else present
    some_null = np.zeros(k, dtype=bool) if null is None else null.any(axis=1)
    plain = np.flatnonzero(wanted & ~some_null)
    if len(plain):
        width = 20 + 12 * n_cols
        buf = np.empty((len(plain), width), dtype=np.uint8)
        buf[:, :20] = np.frombuffer(_header(False, n_cols), dtype=np.uint8)
        elements = buf[:, 20:].view(_ELEMENT)
        elements["length"] = 8
        elements["value"] = values[plain]
        flat = buf.tobytes()
        for j, i in enumerate(plain.tolist()):
            out[i] = Float8Array(flat[j * width: (j + 1) * width])
    if null is None:
        return out
    all_null = null.all(axis=1) if n_cols else np.zeros(k, dtype=bool)
    if all_null.any():
        constant = Float8Array(_header(True, n_cols) + np.full(n_cols, -1, ">i4").tobytes())
        for i in np.flatnonzero(wanted & all_null).tolist():
            out[i] = constant
    header = _header(True, n_cols)
    # rows with some NULL elements: a NULL element is its length alone, the 8 value bytes after each -1 dropped
    for i in np.flatnonzero(wanted & some_null & ~all_null).tolist():
        elements = np.empty(n_cols, dtype=_ELEMENT)
        elements["value"] = values[i]
        elements["length"] = np.where(null[i], -1, 8)
        keep = np.ones((n_cols, 12), dtype=bool)
        keep[:, 4:] = ~null[i][:, None]
        out[i] = Float8Array(header + elements.view(np.uint8).reshape(n_cols, 12)[keep].tobytes())
    return out


def _header(has_null: bool, n_cols: int) -> bytes:
    """array_send's header of a one-dimensional float8 array: dimensions, has-null flag, element type, length,
    lower bound."""
    return np.array([1, int(has_null), _FLOAT8, n_cols, 1], dtype=">i4").tobytes()


def float8_matrix(payloads: Sequence[bytes | None], n_cols: int) -> tuple[npt.NDArray[np.float64],
                                                                          npt.NDArray[np.bool_]]:
    """`array_send` bytes of k one-dimensional float8 arrays as a (k, n_cols) matrix and its NULL mask (a NULL
    array, a NULL element and an element past a shorter array's end are all NULL; NaN there in the matrix)."""
    k = len(payloads)
    full = 20 + 12 * n_cols
    values = np.full((k, n_cols), np.nan)
    null = np.ones((k, n_cols), dtype=bool)
    plain = [i for i, p in enumerate(payloads) if p is not None and len(p) == full and p[7] == 0]  # no NULL in it
    if plain:
        raw = np.frombuffer(b"".join(payloads[i] for i in plain), dtype=np.uint8).reshape(len(plain), full)  # type: ignore[misc]
        values[plain] = raw[:, 20:].copy().view(_ELEMENT)["value"]
        null[plain] = False
    if len(plain) == k:
        return values, null
    for i, p in enumerate(payloads):  # arrays with NULL elements, or of another length: element by element
        if p is None or (len(p) == full and p[7] == 0) or len(p) < 20:  # done above, NULL, or empty
            continue
        at = 20
        for j in range(min(int.from_bytes(p[12:16], "big", signed=True), n_cols)):
            length = int.from_bytes(p[at: at + 4], "big", signed=True)
            at += 4
            if length == 8:
                values[i, j] = np.frombuffer(p, dtype=">f8", count=1, offset=at)[0]
                null[i, j] = False
                at += 8
    return values, null
