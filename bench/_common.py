"""Helpers shared by the benchmarks: databases to run against, a service process, output as table or JSON.

The benchmarks use gradwatch as a user would, through its public names and its command line, and nothing from
tests/: they must keep measuring the product, whatever the tests' helpers become.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

__all__ = ["BenchServer", "fresh_database", "print_table", "rss_mb", "emit"]

POSTGRES_ADMIN_URL = os.environ.get("GRADWATCH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class fresh_database:
    """A new, empty database: a SQLite file in `workdir`, or a PostgreSQL schema dropped on exit."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self.backend, self.workdir = backend, workdir
        self.schema: str | None = None

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


class BenchServer:
    """`gradwatch db upgrade`, then `gradwatch serve` on a free loopback port until `stop()` (SIGTERM)."""

    def __init__(self, database_url: str, log_path: Path, args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, "GRADWATCH_DATABASE_URL": database_url, **(env or {})}
        self.log_path, self.args = log_path, list(args or [])
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        gradwatch = [sys.executable, "-m", "gradwatch_service"]
        subprocess.run([*gradwatch, "db", "upgrade"], env=self.env, check=True, capture_output=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([*gradwatch, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                                          *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gradwatch serve exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"gradwatch serve did not answer on {self.url} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
