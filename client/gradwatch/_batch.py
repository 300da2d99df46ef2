"""A batch of sealed steps as the sender ships it: binary columns built straight from the step records, and
the JSON form only where it is needed (the spool, a service that takes only JSON, a 409's resend).

Building the columns from the records keeps a non-finite value a float all the way to the wire, instead of
float -> "NaN" -> float. The framing is `gradwatch.wire`'s (docs/wire.md); `encode_records` is the one part
wire does not have yet: a batch from values rather than from a JSON-shaped body.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
import sys
from array import array
from typing import Any

from ._step import LAYER_ATTRIBUTES, StepRecord, encode_step
from .wire import (
    BINARY_MAGIC,
    MISSING_BYTES,
    STEP_COLUMN_FIELDS,
    decode_binary_batch,
    encode_binary_batch,
    encode_value,
)

__all__ = ["StepBatch", "encode_records", "spooled_steps"]

_MISSING: float = struct.unpack("<d", MISSING_BYTES)[0]
_LITTLE = sys.byteorder == "little"


class StepBatch:
    """Steps that travel together under one `batch_id` (a resend is the same body, so the service can tell).
    Either fresh records from the queue, or a JSON-shaped body read back from the spool."""

    def __init__(self, batch_id: str, layers: list[str], records: list[StepRecord] | None = None,
                 body: dict[str, Any] | None = None, binary: bytes | None = None, n: int = 0) -> None:
        self.batch_id = batch_id
        self.layers = layers
        self.records = records
        self._body = body
        self._binary = binary
        self._n = n

    @classmethod
    def of(cls, records: list[StepRecord], layers: list[str]) -> StepBatch:
        return cls(os.urandom(16).hex(), list(layers), records)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> StepBatch:
        return cls(str(body.get("batch_id")), list(body.get("layers") or []), body=body)

    @classmethod
    def from_spooled(cls, line: dict[str, Any]) -> StepBatch:
        """A batch as `spooled()` wrote it: binary columns in base64, or a JSON-shaped body (older spools, and
        batches the binary form cannot carry). Raises ValueError for a binary line that is not base64."""
        encoded = line.get("binary")
        if encoded is None:
            return cls.from_body(line)
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, TypeError) as exc:
            raise ValueError(f"a spooled batch's binary body is not base64: {exc}") from exc
        return cls(str(line.get("batch_id")), [], binary=raw, n=int(line.get("n") or 0))

    def __len__(self) -> int:
        if self.records is not None:
            return len(self.records)
        if self._body is None and self._binary is not None:
            return self._n
        return len(self.body().get("steps", ()))

    def spooled(self) -> dict[str, Any]:
        """The batch as one spool line: its binary columns in base64 where they carry it. Building and writing
        the JSON form of 500 steps held the sender (and so the GIL) five times as long, while the training thread
        logs on through an outage (docs/benchmarks.md, log() with the service down)."""
        try:
            raw = self.binary()
        except (ValueError, TypeError, OverflowError):
            return self.body()
        return {"batch_id": self.batch_id, "n": len(self), "binary": base64.b64encode(raw).decode("ascii")}

    def body(self) -> dict[str, Any]:
        """The JSON-shaped batch (values as on the JSON wire), built once on first use."""
        if self._body is None:
            if self.records is None:
                assert self._binary is not None
                self._body = decode_binary_batch(self._binary)
            else:
                self._body = {"batch_id": self.batch_id, "layers": self.layers,
                              "steps": [encode_step(r, self.layers) for r in self.records]}
        return self._body

    def binary(self) -> bytes:
        """The binary body. Raises ValueError/TypeError/OverflowError where the columns cannot carry it (a
        value that is not a number, a step past int64): send `body()` as JSON then."""
        if self._binary is not None:
            return self._binary
        if self.records is not None:
            try:
                return encode_records(self.records, self.layers, self.batch_id)
            except TypeError:
                pass  # a value the columns do not take as it is: wire's general path says whether it can
        return encode_binary_batch(self.body())

    def split(self) -> list[StepBatch]:
        """Two halves, each with its own batch_id derived from this one (for a 413)."""
        body = self.body()
        half = len(body["steps"]) // 2
        return [StepBatch.from_body({**body, "batch_id": f"{self.batch_id}.{i}", "steps": steps})
                for i, steps in enumerate((body["steps"][:half], body["steps"][half:]))]

    def without(self, steps: set[Any]) -> StepBatch:
        """This batch less the given step numbers, under a new batch_id (for a 409's resend)."""
        body = self.body()
        return StepBatch.from_body({**body, "batch_id": self.batch_id + ".r",
                                    "steps": [s for s in body["steps"] if s.get("step") not in steps]})


def spooled_steps(line: dict[str, Any]) -> int:
    """How many steps a spool line holds (either form of `StepBatch.spooled`)."""
    if "binary" in line:
        return int(line.get("n") or 0)
    return len(line.get("steps", ()))


def encode_records(records: list[StepRecord], layers: list[str], batch_id: str | None = None) -> bytes:
    """Sealed, materialized records as a binary step batch, byte for byte what
    `wire.encode_binary_batch` makes of their JSON form. Missing values are the not-measured sentinel."""
    n_layers = len(layers)
    fields = ["step"]
    parts = [_pack("q", [r.step for r in records])]
    for name in STEP_COLUMN_FIELDS:
        column = [getattr(r, name) for r in records]
        if any(v is not None for v in column):
            fields.append(name)
            parts.append(_pack("d", [_MISSING if v is None else v for v in column]))
    for wire_name, attr in LAYER_ATTRIBUTES.items():
        rows: list[dict[str, float | None]] = [getattr(r, attr) for r in records]
        if any(rows):
            fields.append(wire_name)
            flat: list[Any] = []
            for row in rows:
                if row:
                    flat.extend([row.get(layer, _MISSING) for layer in layers])
                else:
                    flat.extend([_MISSING] * n_layers)
            parts.append(_pack("d", flat))
    if any(r.skipped for r in records):
        fields.append("skipped")
        parts.append(bytes(1 if r.skipped else 0 for r in records))
    header: dict[str, Any] = {"n": len(records), "fields": fields}
    if batch_id is not None:
        header["batch_id"] = batch_id
    if layers:
        header["layers"] = layers
    if any(r.scalars for r in records):
        header["scalars"] = [{k: encode_value(v) for k, v in r.scalars.items()} if r.scalars else None
                             for r in records]
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return b"".join([BINARY_MAGIC, struct.pack("<I", len(head)), head, *parts])


def _pack(code: str, values: list[Any]) -> bytes:
    a = array(code, values)
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()
