"""Binary step batches (docs/wire.md): checked as strictly as JSON, kept as the columns they arrived as.

`parse_binary_batch` checks the framing (gradwatch.wire), validates the JSON header with pydantic and every
column's values (step range, finite times, skipped flags), and keeps the per-layer sections as bytes: for a
plain append ingest stores them as they are (SQLite's per-layer blobs are slices of the body, because the binary
wire and SQLite store "not measured" with the same NaN sentinel). Any other batch takes the JSON path
(`StepColumns.to_batch`), so idempotency and conflicts cannot differ by wire.
"""

from __future__ import annotations

import math

from pydantic import ValidationError

from gradwatch.wire import (
    LAYER_FIELDS,
    STEP_COLUMN_FIELDS,
    BinaryBodyError,
    int_column,
    split_binary_batch,
    unpack_floats,
)

from .body import nul_location
from .errors import InvalidInput
from .limits import InputLimits
from .schemas import MAX_STEP, BinaryBatchHeader
from .storage.steps_table import LayerColumn, StepColumns

__all__ = ["parse_binary_batch"]


def parse_binary_batch(raw: bytes, limits: InputLimits) -> StepColumns:
    """Check a binary body completely, and against the limits the JSON wire is held to; any problem is an
    InvalidInput naming where it is (a LimitExceeded naming the setting)."""
    try:
        header_doc, sections = split_binary_batch(raw)  # the framing: a count the body cannot hold is refused
    except BinaryBodyError as exc:
        raise InvalidInput(exc.loc, str(exc)) from None
    try:
        header = BinaryBatchHeader.model_validate(header_doc)
    except ValidationError as exc:
        raise InvalidInput.from_pydantic(exc, ["body", "header"]) from None
    where = nul_location(header_doc, ["body", "header"])
    if where is not None:
        raise InvalidInput(where, "strings may not contain NUL (\\u0000): no database stores it")
    n = header.n
    if header.scalars is not None and len(header.scalars) != n:
        raise InvalidInput(["body", "header", "scalars"], f"has {len(header.scalars)} entries for {n} steps")
    limits.check_batch(n, header.layers, header.scalars or ())
    limits.check_batch_values(sum(len(v) for k, v in sections.items() if k != "skipped") // 8
                              + sum(len(extra) for extra in header.scalars or () if extra))
    if header.layers is not None and len(set(header.layers)) != len(header.layers):
        raise InvalidInput(["body", "header", "layers"], "layer names must be unique")
    steps = int_column(sections["step"])
    if steps and (min(steps) < 0 or max(steps) > MAX_STEP):
        i = next(i for i, s in enumerate(steps) if not 0 <= s <= MAX_STEP)
        raise InvalidInput(["body", "steps", i, "step"], f"step {steps[i]} is not in 0..{MAX_STEP}")
    values: dict[str, list[float | None]] = {}
    for name in STEP_COLUMN_FIELDS:
        if name in sections:
            values[name] = unpack_floats(sections[name])
    times = values.get("time")
    if times is not None and not (None not in times and math.isfinite(sum(times))):  # type: ignore[arg-type]
        for i, t in enumerate(times):
            if t is not None and not math.isfinite(t):
                raise InvalidInput(["body", "steps", i, "time"], "time must be a finite number of unix seconds")
    skipped = None
    if "skipped" in sections:
        skipped = bytes(sections["skipped"])
        if skipped.count(0) + skipped.count(1) != n:
            i = next(i for i, b in enumerate(skipped) if b > 1)
            raise InvalidInput(["body", "steps", i, "skipped"], f"skipped is 0 or 1, not {skipped[i]}")
    n_layers = len(header.layers or ())
    layer_columns = {name: LayerColumn(n, n_layers, section=bytes(sections[name]))
                     for name in LAYER_FIELDS if name in sections}
    return StepColumns(batch_id=header.batch_id, layers=header.layers, steps=steps, values=values,
                       layer_columns=layer_columns, skipped=skipped, scalars=header.scalars)
