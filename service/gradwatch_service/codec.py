"""How measured values are stored, per database, so that NaN and ±Infinity survive exactly.

PostgreSQL stores NaN and ±Infinity natively in `double precision` and `double precision[]`.
SQLite stores ±Infinity in REAL but silently turns a NaN parameter into NULL, so:
- a scalar NaN is stored as the TEXT 'NaN' (SQLite keeps it: 'NaN' is not a numeric literal, so REAL
  affinity leaves it alone), and NULL keeps meaning "not measured";
- per-layer arrays are packed little-endian float64 blobs (8 bytes a value, no per-value overhead), where
  "not measured" is a NaN with a payload the wire can never produce (the wire only carries the canonical NaN).
"""

from __future__ import annotations

import json
import math
import struct
from array import array
from collections.abc import Sequence
from typing import Any

from gradwatch.wire import MISSING_BITS, MISSING_BYTES, decode_value, encode_value

__all__ = [
    "MISSING_BITS",
    "pack_floats",
    "unpack_floats",
    "sqlite_real_in",
    "sqlite_real_out",
    "encode_scalars",
    "decode_scalars",
]

_MISSING = struct.unpack("<d", MISSING_BYTES)[0]  # the binary wire's not-measured sentinel: blobs are its slices
_LITTLE = array("d").itemsize == 8 and struct.pack("=d", 1.0) == struct.pack("<d", 1.0)


def pack_floats(values: Sequence[float | None]) -> bytes:
    """A list of floats (None = not measured) as a float64 blob."""
    a: array[float]
    try:
        a = array("d", values)  # type: ignore[arg-type]  # a None raises TypeError: the rare path below
    except TypeError:  # some layer not measured
        a = array("d", [_MISSING if v is None else v for v in values])
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()


def unpack_floats(blob: bytes) -> list[float | None]:
    """The inverse of pack_floats."""
    a = array("d")
    a.frombytes(blob)
    if not _LITTLE:
        a.byteswap()
    out: list[float | None] = list(a.tolist())
    if MISSING_BYTES in blob:
        for i in range(len(out)):
            if blob[8 * i: 8 * i + 8] == MISSING_BYTES:
                out[i] = None
    return out


def sqlite_real_in(x: float | None) -> float | str | None:
    """A scalar as bound for SQLite: NaN becomes the text 'NaN' instead of NULL."""
    if x is not None and x != x:
        return "NaN"
    return x


def sqlite_real_out(x: Any) -> float | None:
    if x is None or isinstance(x, float):
        return x
    if x == "NaN":
        return math.nan
    return float(x)


def encode_scalars(scalars: dict[str, float | None], sqlite: bool) -> Any:
    """A step's extra scalars as stored: wire-encoded values (NaN as "NaN"); JSON text on SQLite, a document
    (JSONB) on PostgreSQL."""
    doc = {k: encode_value(v) for k, v in scalars.items()}
    return json.dumps(doc) if sqlite else doc


def decode_scalars(stored: Any) -> dict[str, float | None] | None:
    """The inverse of encode_scalars, from either database."""
    if stored is None:
        return None
    if isinstance(stored, str):
        stored = json.loads(stored)
    return {k: decode_value(v) for k, v in stored.items()}
