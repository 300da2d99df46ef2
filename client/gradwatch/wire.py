"""The contract between the client and the service (docs/wire.md): names, identifiers and value encodings.

Everything both sides must agree on lives here, once: the run-id pattern, run statuses, the step's field names,
the version and user agent, how values are written. Non-finite floats are the signal this product exists for,
so they travel as the JSON strings "NaN", "Infinity" and "-Infinity" (the protobuf JSON convention); a bare NaN
token is not JSON. Step batches also travel as binary columns of float64 (below), where NaN and ±Infinity are
themselves.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from array import array
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

__all__ = [
    "BINARY_CONTENT_TYPE",
    "BINARY_FIELDS",
    "BinaryBodyError",
    "LAYER_FIELDS",
    "MISSING_BITS",
    "MISSING_BYTES",
    "NONFINITE_STRINGS",
    "RUN_ID_PATTERN",
    "RUN_STATUSES",
    "RunStatus",
    "SCALAR_FIELDS",
    "STEP_COLUMN_FIELDS",
    "USER_AGENT",
    "VERSION",
    "decode_binary_batch",
    "decode_value",
    "encode_binary_batch",
    "encode_value",
    "int_column",
    "jsonable",
    "pack_floats",
    "split_binary_batch",
    "to_float",
    "unpack_floats",
]

VERSION = "0.1.0"
USER_AGENT = f"gradwatch-python/{VERSION}"
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
"""A client-chosen run id: 1-128 characters, a letter or digit first; it appears in URLs unescaped."""
RunStatus = Literal["running", "finished", "failed", "crashed", "stopped"]
RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)

SCALAR_FIELDS = ("loss", "grad_norm", "lr", "update_norm")
"""A step's measured values, one each (`time`, `step`, `skipped` and `scalars` are not measurements)."""
LAYER_FIELDS = ("layer_grad_norms", "layer_weight_norms", "layer_update_norms")
"""A step's per-layer measured values, aligned with the batch's (or the run's) layer names."""

NONFINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_value(x: float | None) -> float | str | None:
    """A float as it goes on the wire: itself when finite, else its name."""
    if x is None or math.isfinite(x):
        return x
    if x != x:
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"


def decode_value(x: Any) -> float | None:
    """A wire value back to a float; raises ValueError for anything that is not a value."""
    if x is None:
        return None
    if isinstance(x, bool):
        raise ValueError(f"not a number: {x!r}")
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x in NONFINITE_STRINGS:
        return NONFINITE_STRINGS[x]
    raise ValueError(f"not a number: {x!r} (non-finite values are \"NaN\", \"Infinity\", \"-Infinity\")")


def jsonable(value: Any) -> Any:
    """Free-form JSON (config, meta, scalars) as it may go on the wire and into a JSON column: non-finite floats
    as their wire names, keys as strings, tuples as lists, anything else that is not JSON as its str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else encode_value(value)
    if value is None or isinstance(value, (str, int)):  # bool is an int
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def to_float(x: Any) -> float | None:
    """Python floats, ints, numpy scalars and 0-d tensors to a float, without importing numpy or torch."""
    if x is None:
        return None
    if isinstance(x, float):
        return x
    item = getattr(x, "item", None)
    if item is not None:
        x = item()
    return float(x)


# ------------------------------------------------------------------------------------------ binary batches
# A step batch as columns of little-endian numbers (docs/wire.md, "Binary step batches"): what the client
# sends by default. Building it is a few C-level array calls instead of formatting 50 floats per step as text,
# and the service stores its per-layer arrays as they arrive.

BINARY_CONTENT_TYPE = "application/vnd.gradwatch.steps+binary"
BINARY_MAGIC = b"GWS1"
MISSING_BITS = 0x7FF8_0000_DEAD_0001
"""In a binary float64 column, this NaN bit pattern means *not measured* (JSON null); every other bit pattern,
any other NaN included, is the value itself. SQLite's per-layer blobs use the same sentinel."""
STEP_COLUMN_FIELDS = ("time", *SCALAR_FIELDS)
"""float64, one per step; the LAYER_FIELDS are float64, one per step and layer, step-major"""
BINARY_FIELDS = ("step", *STEP_COLUMN_FIELDS, *LAYER_FIELDS, "skipped")

_MISSING = struct.unpack("<d", struct.pack("<Q", MISSING_BITS))[0]
MISSING_BYTES = struct.pack("<Q", MISSING_BITS)
"""The sentinel as it lies in a column or a stored blob."""
_LITTLE = sys.byteorder == "little"


class BinaryBodyError(ValueError):
    """A binary batch whose framing is wrong (magic, header, section sizes); `loc` says where."""

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def pack_floats(values: Sequence[Any]) -> bytes:
    """Floats (or wire values) as a little-endian float64 column, None as the not-measured sentinel: a binary
    batch's section, and the blob SQLite stores a per-layer array as."""
    return _column(values, "d")


def _column(values: Sequence[Any], code: str) -> bytes:
    """float64 (code "d") or int64 ("q") values as little-endian bytes; None is the not-measured sentinel."""
    try:
        a = array(code, values)
    except TypeError:  # None (not measured) or a wire string ("NaN") somewhere: the rare path
        a = array(code, [_MISSING if v is None else decode_value(v) for v in values])
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()


def encode_binary_batch(body: dict[str, Any]) -> bytes:
    """A JSON-shaped step batch (`{"batch_id", "layers", "steps": [...]}`, values as on the JSON wire) as a
    binary body. Columns that no step carries are left out; a step without a column's value gets the sentinel."""
    steps: list[dict[str, Any]] = body["steps"]
    layers: list[str] = list(body.get("layers") or [])
    n_layers = len(layers)
    fields = ["step"]
    parts = [_column([s["step"] for s in steps], "q")]
    for name in STEP_COLUMN_FIELDS:
        column = [s.get(name) for s in steps]
        if any(v is not None for v in column):
            fields.append(name)
            parts.append(pack_floats(column))
    for name in LAYER_FIELDS:
        rows = [s.get(name) for s in steps]
        if any(rows):
            if any(r is not None and len(r) != n_layers for r in rows):
                raise ValueError(f"{name}: every step needs one value per layer ({n_layers})")
            fields.append(name)
            flat: list[Any] = []
            for r in rows:
                flat.extend(r if r is not None else (None,) * n_layers)
            parts.append(pack_floats(flat))
    if any(s.get("skipped") for s in steps):
        fields.append("skipped")
        parts.append(bytes(1 if s.get("skipped") else 0 for s in steps))
    header: dict[str, Any] = {"n": len(steps), "fields": fields}
    if body.get("batch_id") is not None:
        header["batch_id"] = body["batch_id"]
    if layers:
        header["layers"] = layers
    if any(s.get("scalars") for s in steps):
        header["scalars"] = [s.get("scalars") or None for s in steps]
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return b"".join([BINARY_MAGIC, struct.pack("<I", len(head)), head, *parts])


def split_binary_batch(raw: bytes, max_steps: int | None = None) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """The header and each section of a binary body, with the framing checked: magic, header, that every
    section has exactly the size the header implies and nothing follows. Values are not looked at."""
    if len(raw) < 8 or raw[:4] != BINARY_MAGIC:
        raise BinaryBodyError(["body"], f"a binary step batch starts with {BINARY_MAGIC!r} and a header length")
    (head_len,) = struct.unpack_from("<I", raw, 4)
    if 8 + head_len > len(raw):
        raise BinaryBodyError(["body", "header"], f"header length {head_len} runs past the {len(raw)}-byte body")
    try:
        header = json.loads(raw[8: 8 + head_len], parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError; RecursionError: absurdly deep nesting
        raise BinaryBodyError(["body", "header"], f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BinaryBodyError(["body", "header"], "header must be a JSON object")
    n, fields, layers = header.get("n"), header.get("fields"), header.get("layers")
    if type(n) is not int or n < 0:
        raise BinaryBodyError(["body", "header", "n"], "n must be the number of steps, an integer >= 0")
    if max_steps is not None and n > max_steps:
        raise BinaryBodyError(["body", "header", "n"], f"{n} steps in one batch; at most {max_steps} "
                                                       "(send several batches)")
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise BinaryBodyError(["body", "header", "fields"], "fields must be a list of section names")
    unknown = [f for f in fields if f not in BINARY_FIELDS]
    if unknown or len(set(fields)) != len(fields) or "step" not in fields:
        raise BinaryBodyError(["body", "header", "fields"],
                              f"fields must name each section once, include 'step', and be of {list(BINARY_FIELDS)}"
                              f"{f'; unknown: {unknown}' if unknown else ''}")
    if layers is not None and not isinstance(layers, list):
        raise BinaryBodyError(["body", "header", "layers"], "layers must be a list of names")
    n_layers = len(layers) if layers is not None else None
    sections: dict[str, memoryview] = {}
    offset = 8 + head_len
    view = memoryview(raw)
    for name in fields:
        if name in LAYER_FIELDS:
            if n_layers is None:
                raise BinaryBodyError(["body", "header", "layers"], f"section {name!r} needs the header's layers")
            size = 8 * n * n_layers
        else:
            size = n if name == "skipped" else 8 * n
        if offset + size > len(raw):
            raise BinaryBodyError(["body", name], f"section {name!r} needs {size} bytes at offset {offset}; "
                                                  f"the body has {len(raw)}")
        sections[name] = view[offset: offset + size]
        offset += size
    if offset != len(raw):
        raise BinaryBodyError(["body"], f"{len(raw) - offset} bytes after the last section")
    return header, sections


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def unpack_floats(section: memoryview | bytes) -> list[float | None]:
    """A float64 column (a section, a stored blob) as floats, the not-measured sentinel as None."""
    a = array("d")
    a.frombytes(section)
    if not _LITTLE:
        a.byteswap()
    out: list[float | None] = a.tolist()  # type: ignore[assignment]
    data = bytes(section) if isinstance(section, memoryview) else section
    if MISSING_BYTES not in data:
        return out
    at = data.find(MISSING_BYTES)
    while at >= 0:
        if at % 8 == 0:
            out[at // 8] = None
            at = data.find(MISSING_BYTES, at + 8)
        else:
            at = data.find(MISSING_BYTES, at + 1)
    return out


def int_column(section: memoryview | bytes) -> list[int]:
    """An int64 section (the steps) as ints."""
    a = array("q")
    a.frombytes(section)
    if not _LITTLE:
        a.byteswap()
    return a.tolist()


def decode_binary_batch(raw: bytes) -> dict[str, Any]:
    """A binary body as the JSON-shaped batch it stands for, values as on the JSON wire (for tests, tools)."""
    header, sections = split_binary_batch(raw)
    n = header["n"]
    n_layers = len(header.get("layers") or [])
    steps: list[dict[str, Any]] = [{"step": s} for s in int_column(sections["step"])]
    for name, section in sections.items():
        if name in STEP_COLUMN_FIELDS:
            for s, v in zip(steps, unpack_floats(section), strict=True):
                if v is not None:
                    s[name] = encode_value(v)
        elif name in LAYER_FIELDS:
            flat = [encode_value(v) for v in unpack_floats(section)]
            for i, s in enumerate(steps):
                row = flat[i * n_layers: (i + 1) * n_layers]
                if any(v is not None for v in row):  # a row of sentinels only: the step has no such field
                    s[name] = row
        elif name == "skipped":
            for s, b in zip(steps, bytes(section), strict=True):
                s["skipped"] = bool(b)
    for s, scalars in zip(steps, header.get("scalars") or [None] * n, strict=False):
        if scalars:
            s["scalars"] = scalars
    out: dict[str, Any] = {"steps": steps}
    for key in ("batch_id", "layers"):
        if key in header:
            out[key] = header[key]
    return out
