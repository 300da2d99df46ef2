"""How measured values are stored, per database, so that NaN and ±Infinity survive exactly.

PostgreSQL stores NaN and ±Infinity natively in `double precision` and `double precision[]`.
SQLite stores ±Infinity in REAL but silently turns a NaN parameter into NULL, so:
- a scalar NaN is stored as the TEXT 'NaN' (SQLite keeps it: 'NaN' is not a numeric literal, so REAL
  affinity leaves it alone), and NULL keeps meaning "not measured";
- per-layer arrays are little-endian float64 blobs (8 bytes a value, no per-value overhead): the binary wire's
  own column format (`gradwatch.wire.pack_floats`), where "not measured" is a NaN with a payload no arithmetic
  produces, so a binary batch's per-layer rows are stored as they arrived.
"""

from __future__ import annotations

import json
import math
from typing import Any

from gradwatch.wire import decode_value, encode_value

__all__ = ["sqlite_real_in", "sqlite_real_out", "encode_scalars", "decode_scalars"]


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
