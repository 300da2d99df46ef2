"""Runs as trace files, the labelled traces' format (`../shared/traces/README.md`), both ways.

A trace is a header line (`{"kind": "run", "run_id": ..., "config": ..., "meta": ...}`, plus whatever else the
trace carries, e.g. `family` and `labels`) and one line per step (`{"kind": "step", "step": 0, "loss": ...,
"layer_grad_norms": {"layer": value, ...}, ...}`), non-finite values as "NaN", "Infinity", "-Infinity". What
the service knows beyond the traces' fields travels too, so export → import → export is exact: the header gets
`project`, `name` and `status`, and a step its `time` (and `layer_update_norms`, `scalars`, `skipped` where it
has them). Header fields the service has no place for (`family`, `labels`) are kept in the run's meta under
`TRACE_HEADER_KEY` and put back on export.

CSV carries the same: a first line `# ` + the header's JSON, then a row of column names (`step`, `time`, the
scalar fields, `scalars`, `skipped`, and one `<field>:<layer>` column per per-layer field and layer), then one
row per step; an empty cell is "not measured", and floats are written with `repr`, so they read back exactly.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

from .wire import LAYER_FIELDS, NONFINITE_STRINGS

__all__ = ["TRACE_HEADER_KEY", "TraceFormat", "batch_body", "csv_columns", "header_line", "open_text", "read_trace",
           "run_body", "step_line", "write_csv_header", "write_csv_row"]

TRACE_HEADER_KEY = "trace_header"
"""The run meta key that holds a trace header's fields the service has no column for (family, labels, ...)."""
TraceFormat = str
""""jsonl" or "csv"."""
_STEP_SCALARS = ("loss", "lr", "grad_norm", "update_norm")
"""A step line's scalar fields, in the traces' order."""
_SERVICE_HEADER = ("kind", "run_id", "project", "name", "status", "config", "meta")


def open_text(path: str, mode: str) -> IO[str]:
    """A text file, gzip'd when its name ends in .gz; "-" is standard input or output."""
    import sys

    if path == "-":
        return sys.stdin if "r" in mode else sys.stdout
    if path.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8", newline="")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8", newline="")  # noqa: SIM115 - the caller closes it


# ------------------------------------------------------------------------------------------------- export

def header_line(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run as the service describes it (`GET /v1/runs/{id}`) as a trace's header line."""
    meta = dict(run.get("meta") or {})
    extra = meta.pop(TRACE_HEADER_KEY, None)
    line: dict[str, Any] = {"kind": "run", "run_id": run["run_id"]}
    if isinstance(extra, dict):
        line.update({k: v for k, v in extra.items() if k not in _SERVICE_HEADER})
    line.update(project=run.get("project"), name=run.get("name"), status=run.get("status"),
                config=run.get("config"), meta=meta or None)
    return line


def step_line(step: Mapping[str, Any], layers: list[str]) -> dict[str, Any]:
    """A step as the service stores it (`GET /v1/runs/{id}/steps`: per-layer arrays in the run's layer order)
    as a trace's step line: per-layer values by name, fields that were not measured left out."""
    line: dict[str, Any] = {"kind": "step", "step": step["step"], "time": step.get("time")}
    for name in _STEP_SCALARS[:3]:
        if step.get(name) is not None:
            line[name] = step[name]
    for field in LAYER_FIELDS:
        values = step.get(field)
        if values:
            by_layer = {layer: v for layer, v in zip(layers, values, strict=False) if v is not None}
            if by_layer:
                line[field] = by_layer
    if step.get("update_norm") is not None:
        line["update_norm"] = step["update_norm"]
    if step.get("scalars"):
        line["scalars"] = step["scalars"]
    if step.get("skipped"):
        line["skipped"] = True
    if line["time"] is None:
        del line["time"]
    return line


def csv_columns(layers: list[str]) -> list[str]:
    return ["step", "time", *_STEP_SCALARS, "scalars", "skipped",
            *(f"{field}:{layer}" for field in LAYER_FIELDS for layer in layers)]


def write_csv_header(out: IO[str], header: Mapping[str, Any], columns: list[str]) -> Any:
    """The header comment and the column row; returns the csv writer for `write_csv_row`."""
    out.write("# " + json.dumps(header, allow_nan=False) + "\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    return writer


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def write_csv_row(writer: Any, line: Mapping[str, Any], columns: list[str]) -> None:
    """One step line as a CSV row of `columns`."""
    row = []
    for column in columns:
        field, _, layer = column.partition(":")
        if layer:
            row.append(_cell((line.get(field) or {}).get(layer)))
        elif field == "scalars":
            row.append(json.dumps(line["scalars"], allow_nan=False) if line.get("scalars") else "")
        elif field == "skipped":
            row.append("1" if line.get("skipped") else "")
        else:
            row.append(_cell(line.get(field)))
    writer.writerow(row)


# ------------------------------------------------------------------------------------------------- import

def read_trace(f: IO[str], fmt: TraceFormat) -> tuple[dict[str, Any] | None, Iterator[dict[str, Any]]]:
    """The header line (None when the trace has none) and the step lines, read as they are iterated."""
    if fmt == "csv":
        return _read_csv(f)
    first = f.readline()
    header = None
    pending: list[str] = []
    if first.strip():
        parsed = json.loads(first)
        if isinstance(parsed, dict) and parsed.get("kind") == "run":
            header = parsed
        else:
            pending.append(first)
    return header, _jsonl_steps(pending, f)


def _jsonl_steps(pending: list[str], f: IO[str]) -> Iterator[dict[str, Any]]:
    for lineno, text in enumerate([*pending, *f], start=2 - len(pending)):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"line {lineno}: not JSON: {exc}") from None
        if not isinstance(line, dict) or line.get("kind", "step") != "step" or not isinstance(line.get("step"), int):
            raise ValueError(f"line {lineno}: expected a step line with an integer 'step'")
        yield line


def _number(cell: str) -> float | str | None:
    if cell == "":
        return None
    if cell in NONFINITE_STRINGS:
        return cell
    return float(cell)


def _read_csv(f: IO[str]) -> tuple[dict[str, Any] | None, Iterator[dict[str, Any]]]:
    first = f.readline()
    header = None
    if first.startswith("#"):
        header = json.loads(first[1:])
        columns = next(csv.reader(io.StringIO(f.readline())))
    else:
        columns = next(csv.reader(io.StringIO(first)))
    if not columns or columns[0] != "step":
        raise ValueError("a CSV trace's column row starts with 'step'")

    def rows() -> Iterator[dict[str, Any]]:
        for lineno, row in enumerate(csv.reader(f), start=3 if header is not None else 2):
            if not row:
                continue
            if len(row) != len(columns):
                raise ValueError(f"line {lineno}: {len(row)} cells; the column row has {len(columns)}")
            line: dict[str, Any] = {"kind": "step"}
            try:
                for column, cell in zip(columns, row, strict=True):
                    field, _, layer = column.partition(":")
                    if field == "step":
                        line["step"] = int(cell)
                    elif layer:
                        value = _number(cell)
                        if value is not None:
                            line.setdefault(field, {})[layer] = value
                    elif field == "scalars":
                        if cell:
                            line["scalars"] = json.loads(cell)
                    elif field == "skipped":
                        if cell in ("1", "true", "True"):
                            line["skipped"] = True
                    elif cell != "":
                        line[field] = _number(cell)
            except ValueError as exc:
                raise ValueError(f"line {lineno}: {exc}") from None
            yield line

    return header, rows()


def run_body(header: Mapping[str, Any] | None, *, project: str | None, name: str | None) -> dict[str, Any]:
    """The `PUT /v1/runs/{id}` body that makes a trace's run: the header's config and meta, its other fields
    kept in the meta (`TRACE_HEADER_KEY`), and a status of running until the last step is in."""
    header = header or {}
    meta = dict(header.get("meta") or {})
    extra = {k: v for k, v in header.items() if k not in _SERVICE_HEADER}
    if extra:
        meta[TRACE_HEADER_KEY] = extra
    body: dict[str, Any] = {"status": "running", "project": project or header.get("project"),
                            "name": name or header.get("name"), "config": header.get("config"),
                            "meta": meta or None}
    return {k: v for k, v in body.items() if v is not None}


def batch_body(lines: Iterable[Mapping[str, Any]], batch_id: str) -> dict[str, Any]:
    """Trace step lines as a JSON-shaped step batch: per-layer values as arrays in the order their layers first
    appear, a layer a step lacks as null (not measured)."""
    lines = list(lines)
    layers: dict[str, None] = {}
    for line in lines:
        for field in LAYER_FIELDS:
            layers.update(dict.fromkeys(line.get(field) or ()))
    names = list(layers)
    steps = []
    for line in lines:
        step: dict[str, Any] = {"step": line["step"]}
        for key in ("time", *_STEP_SCALARS, "scalars"):
            if line.get(key) is not None:
                step[key] = line[key]
        if line.get("skipped"):
            step["skipped"] = True
        for field in LAYER_FIELDS:
            by_layer = line.get(field)
            if by_layer:
                step[field] = [by_layer.get(n) for n in names]
        steps.append(step)
    return {"batch_id": batch_id, "layers": names, "steps": steps}
