"""Helpers shared by the benchmarks: databases to run against, a server process, output as table or JSON."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.serverproc import ServerProcess, free_port  # noqa: E402

__all__ = ["ROOT", "ServerProcess", "free_port", "fresh_database", "print_table", "rss_mb", "emit"]

POSTGRES_ADMIN_URL = os.environ.get("GRADWATCH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class fresh_database:
    """A new, empty database: a SQLite file in `workdir`, or a PostgreSQL schema dropped on exit."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self.backend, self.workdir, self.schema = backend, workdir, None

    def __enter__(self) -> str:
        from sqlalchemy import create_engine, text

        if self.backend == "sqlite":
            self.path = self.workdir / f"bench-{uuid.uuid4().hex[:8]}.db"
            return f"sqlite:///{self.path}"
        self.schema = f"gw_bench_{uuid.uuid4().hex[:10]}"
        eng = create_engine(POSTGRES_ADMIN_URL)
        with eng.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{self.schema}"'))
        eng.dispose()
        return f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{self.schema}"

    def __exit__(self, *exc: object) -> None:
        from sqlalchemy import create_engine, text

        if self.schema:
            eng = create_engine(POSTGRES_ADMIN_URL)
            with eng.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            eng.dispose()


def rss_mb(pid: int) -> float:
    """Resident set size of a process and its children (uvicorn workers), in MB."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    print("-" * len(title))
    for k, v in rows:
        shown = f"{v:,.1f}" if isinstance(v, float) else str(v)
        print(f"{k:<{width}}  {shown:>16}")
    print()


def emit(figures: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(figures))
