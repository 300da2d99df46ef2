"""Binary step batches (docs/wire.md): checked as strictly as JSON, kept as columns.

`parse_binary_batch` checks the framing (gradwatch.wire), validates the JSON header with pydantic and every
column's values (step range, finite times, skipped flags), and keeps the per-layer sections as the bytes they
arrived as. For the common batch — new steps, ascending, in the run's layer order — ingest builds its rows
straight from the columns (`StepColumns.rows`): SQLite's per-layer blobs are slices of the body, because the
binary wire and SQLite store "not measured" with the same NaN sentinel. Every other batch (resends, repeats,
out-of-order steps, another layer order) goes through `to_batch()` and the same code as JSON.
"""

from __future__ import annotations

import math
import time as _time
from collections.abc import Sequence
from itertools import repeat
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from gradwatch.wire import (
    LAYER_FIELDS,
    MISSING_BYTES,
    STEP_COLUMN_FIELDS,
    BinaryBodyError,
    int_column,
    split_binary_batch,
    unpack_floats,
)

from .body import nul_location
from .codec import encode_scalars
from .models import FLAG_SKIPPED
from .schemas import MAX_STEP, BinaryBatchHeader, StepBatch

__all__ = ["StepColumns", "parse_binary_batch"]

_MEASURED = STEP_COLUMN_FIELDS[1:]  # loss, grad_norm, lr, update_norm: every step column but time


class StepColumns:
    """A validated binary batch. `layers` is None when the batch names none (then it has no layer columns)."""

    def __init__(self, header: BinaryBatchHeader, steps: list[int], values: dict[str, list[float | None]],
                 layer_sections: dict[str, bytes], skipped: bytes | None) -> None:
        self.batch_id = header.batch_id
        self.layers = header.layers
        self.n = header.n
        self.steps = steps
        self.values = values  # time, loss, grad_norm, lr, update_norm: the columns the body carries
        self.layer_sections = layer_sections
        self.skipped = skipped
        self.scalars = header.scalars
        self._layer_rows: dict[str, list[list[float | None] | None]] = {}

    def is_plain_append(self, last_step: int | None) -> bool:
        """Unique, ascending steps, all after the run's last one: nothing to compare, nothing late."""
        steps = self.steps
        if not steps or (last_step is not None and steps[0] <= last_step):
            return False
        return all(a < b for a, b in zip(steps, steps[1:], strict=False))

    def layer_rows(self, name: str) -> list[list[float | None] | None]:
        """A per-layer column as one list per step (None for a step with no measured value in it)."""
        rows = self._layer_rows.get(name)
        if rows is None:
            n_layers = len(self.layers or ())
            section = self.layer_sections.get(name)
            if section is None or n_layers == 0:
                rows = [None] * self.n
            else:
                flat = unpack_floats(section)
                full = [flat[i: i + n_layers] for i in range(0, len(flat), n_layers)]
                rows = [None if row.count(None) == n_layers else row for row in full] \
                    if MISSING_BYTES in section else list(full)
            self._layer_rows[name] = rows
        return rows

    def _layer_blobs(self, name: str) -> Sequence[bytes | None]:
        """A per-layer column as SQLite stores it: one little-endian float64 blob per step, sliced from the body."""
        n_layers = len(self.layers or ())
        section = self.layer_sections.get(name)
        if section is None or n_layers == 0:
            return repeat(None, self.n)  # type: ignore[return-value]
        width = 8 * n_layers
        blobs: list[bytes | None] = [section[i: i + width] for i in range(0, len(section), width)]
        if MISSING_BYTES in section:
            empty = MISSING_BYTES * n_layers
            blobs = [None if b == empty else b for b in blobs]
        return blobs

    def rows(self, run_pk: int, sqlite: bool) -> list[tuple[Any, ...]]:
        """Database rows of the steps (see ingest.STEP_COLUMNS), for a plain append."""
        n = self.n
        times = self.values.get("time")
        if times is None:
            time_col: Sequence[float | None] = repeat(_time.time(), n)  # type: ignore[assignment]
        elif None in times:
            now = _time.time()
            time_col = [now if t is None else t for t in times]
        else:
            time_col = times
        scalar_cols: list[Sequence[Any]] = []
        for name in _MEASURED:
            col = self.values.get(name)
            if col is None:
                scalar_cols.append(repeat(None, n))  # type: ignore[arg-type]
            elif sqlite:  # SQLite would store a NaN parameter as NULL; see codec
                scalar_cols.append([v if v == v else "NaN" for v in col])
            else:
                scalar_cols.append(col)
        flags: Sequence[int] = repeat(0, n)  # type: ignore[assignment]
        if self.skipped is not None:
            flags = [FLAG_SKIPPED if b else 0 for b in self.skipped]
        layer_cols = [self._layer_blobs(name) if sqlite else self.layer_rows(name) for name in LAYER_FIELDS]
        scalars: Sequence[Any] = repeat(None, n)  # type: ignore[assignment]
        if self.scalars is not None:
            scalars = [None if s is None else encode_scalars(s, sqlite) for s in self.scalars]
        return list(zip(repeat(run_pk, n), self.steps, time_col, *scalar_cols, flags, *layer_cols, scalars,
                        strict=False))

    def detector_steps(self, layer_names: list[str]) -> list[dict[str, Any]]:
        """The steps as `detect.advance` reads them (detection.detector_step's form), built from the columns."""
        n = self.n
        scalar_cols: list[Sequence[Any]] = [self.values.get(name) or repeat(None, n)  # type: ignore[misc]
                                            for name in _MEASURED]
        grads, weights, updates = (self.layer_rows(name) for name in LAYER_FIELDS)
        skipped: Sequence[bool] = [bool(b) for b in self.skipped] if self.skipped is not None \
            else repeat(False, n)  # type: ignore[assignment]
        return [{"step": t, "loss": loss, "grad_norm": g, "lr": lr, "update_norm": u, "skipped": sk,
                 "layer_names": layer_names, "layer_grad_norms": lg, "layer_weight_norms": lw,
                 "layer_update_norms": lu}
                for t, loss, g, lr, u, sk, lg, lw, lu in zip(self.steps, *scalar_cols, skipped, grads, weights,
                                                              updates, strict=False)]

    def to_batch(self) -> StepBatch:
        """The same batch as JSON would have carried it, for ingest's general path."""
        steps: list[dict[str, Any]] = [{"step": s} for s in self.steps]
        for name, col in self.values.items():
            for d, v in zip(steps, col, strict=True):
                if v is not None:
                    d[name] = v
        for name in LAYER_FIELDS:
            if name in self.layer_sections:
                for d, row in zip(steps, self.layer_rows(name), strict=True):
                    if row is not None:
                        d[name] = row
        if self.skipped is not None:
            for d, b in zip(steps, self.skipped, strict=True):
                d["skipped"] = bool(b)
        if self.scalars is not None:
            for d, scalars in zip(steps, self.scalars, strict=True):
                if scalars is not None:
                    d["scalars"] = scalars
        return StepBatch.model_validate({"batch_id": self.batch_id, "layers": self.layers, "steps": steps})


def _invalid(loc: list[str | int], msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": tuple(loc), "type": "value_error", "msg": msg}])


def parse_binary_batch(raw: bytes, max_steps: int) -> StepColumns:
    """Check a binary body completely; any problem is a 422 naming where it is."""
    try:
        header_doc, sections = split_binary_batch(raw, max_steps)
    except BinaryBodyError as exc:
        raise _invalid(exc.loc, str(exc)) from None
    try:
        header = BinaryBatchHeader.model_validate(header_doc)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        for e in errors:
            e["loc"] = ("body", "header", *e["loc"])
        raise RequestValidationError(errors) from None
    where = nul_location(header_doc, ["body", "header"])
    if where is not None:
        raise _invalid(where, "strings may not contain NUL (\\u0000): no database stores it")
    n = header.n
    if header.scalars is not None and len(header.scalars) != n:
        raise _invalid(["body", "header", "scalars"], f"has {len(header.scalars)} entries for {n} steps")
    if header.layers is not None and len(set(header.layers)) != len(header.layers):
        raise _invalid(["body", "header", "layers"], "layer names must be unique")
    steps = int_column(sections["step"])
    if steps and (min(steps) < 0 or max(steps) > MAX_STEP):
        i = next(i for i, s in enumerate(steps) if not 0 <= s <= MAX_STEP)
        raise _invalid(["body", "steps", i, "step"], f"step {steps[i]} is not in 0..{MAX_STEP}")
    values: dict[str, list[float | None]] = {}
    for name in STEP_COLUMN_FIELDS:
        if name in sections:
            values[name] = unpack_floats(sections[name])
    times = values.get("time")
    if times is not None and not (None not in times and math.isfinite(sum(times))):  # type: ignore[arg-type]
        for i, t in enumerate(times):
            if t is not None and not math.isfinite(t):
                raise _invalid(["body", "steps", i, "time"], "time must be a finite number of unix seconds")
    skipped = None
    if "skipped" in sections:
        skipped = bytes(sections["skipped"])
        if skipped.count(0) + skipped.count(1) != n:
            i = next(i for i, b in enumerate(skipped) if b > 1)
            raise _invalid(["body", "steps", i, "skipped"], f"skipped is 0 or 1, not {skipped[i]}")
    layer_sections = {name: bytes(sections[name]) for name in LAYER_FIELDS if name in sections}
    return StepColumns(header, steps, values, layer_sections, skipped)
