"""`gradwatch export RUN`: a run's every stored step, in the labelled traces' format (JSON lines, or CSV), read
page by page (`GET /v1/runs/{id}/steps`), so a long run streams out in bounded requests."""

from __future__ import annotations

import argparse
import json
import sys

from ._service import ServiceError, add_connection_arguments, service_from_args
from .traces import csv_columns, header_line, open_text, step_line, write_csv_header, write_csv_row

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN", help="the run's id")
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="jsonl (default) or csv")
    parser.add_argument("--out", default="-", metavar="FILE", help="where to write (default: standard output; "
                                                                   "a name ending in .gz is gzip'd)")
    parser.add_argument("--page-steps", type=int, default=2000, help="steps per request (default 2000)")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    page_steps = max(1, min(args.page_steps, 100_000))
    try:
        with service_from_args(args) as service:
            run = service.get(f"/v1/runs/{args.run_id}")
            out = open_text(args.out, "w")
            try:
                header = header_line(run)
                columns = csv_columns(run["layers"])
                writer = write_csv_header(out, header, columns) if args.format == "csv" else None
                if writer is None:
                    out.write(json.dumps(header, allow_nan=False) + "\n")
                start, n = 0, 0
                while True:
                    page = service.get(f"/v1/runs/{args.run_id}/steps", start=start, limit=page_steps)
                    for step in page["steps"]:
                        line = step_line(step, page["layers"])
                        if writer is not None:
                            write_csv_row(writer, line, columns)
                        else:
                            out.write(json.dumps(line, allow_nan=False) + "\n")
                    n += len(page["steps"])
                    if len(page["steps"]) < page_steps:
                        break
                    start = page["steps"][-1]["step"] + 1
            finally:
                if out is not sys.stdout:
                    out.close()
                else:
                    out.flush()
    except ServiceError as exc:
        print(f"gradwatch export: {exc}", file=sys.stderr)
        return 1
    if args.out != "-":
        print(f"{args.run_id}: {n} steps written to {args.out}", file=sys.stderr)
    return 0
