"""The tests' reading of a binary step batch: what the service must take it to mean, written independently of
the service's parser (service/gradwatch_service/binary_batch.py), from the wire's public pieces."""

from __future__ import annotations

from typing import Any

from gradwatch.wire import LAYER_FIELDS, STEP_COLUMN_FIELDS, encode_value, int_column, split_binary_batch, unpack_floats

__all__ = ["decode_binary_batch"]


def decode_binary_batch(raw: bytes) -> dict[str, Any]:
    """A binary body as the JSON-shaped batch it stands for, values as on the JSON wire."""
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
