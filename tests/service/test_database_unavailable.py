"""The database is unavailable for a while: ingest answers 503 with Retry-After (not 500, not a hang), /readyz says
so while /healthz stays up, the real client spools and delivers everything exactly once when the database is back.

SQLite: another process holds the write lock (the service's `<db>.lock` flock and `BEGIN IMMEDIATE`, or
`BEGIN IMMEDIATE` alone, as a foreign tool would) for longer than the service's busy timeout. PostgreSQL: the
shared server keeps running; the service reaches it through a proxy on a loopback port that refuses and cuts
connections (tests/support/dbproxy.py).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

import gradwatch

from ..support.databases import POSTGRES_ADMIN_URL, PostgresSchema, require_postgres
from ..support.dbproxy import TcpProxy
from ..support.serverproc import ServerProcess

OUTAGE_ENV = {"GRADWATCH_DB_BUSY_TIMEOUT_S": "1", "GRADWATCH_DB_RETRY_AFTER_S": "1"}
CLIENT = {"batch_age": 0.05, "min_backoff": 0.05, "max_backoff": 0.5, "timeout": 10.0,
          "on_critical": "stop"}  # the NaN steps raise criticals: heard, not warned about (warnings are errors)

_LOCKER = textwrap.dedent("""
    import fcntl, os, sqlite3, sys
    db, take_flock = sys.argv[1], sys.argv[2] == "flock"
    if take_flock:
        fd = os.open(db + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("ROLLBACK")
    conn.close()
""")


@contextmanager
def write_locked(db_path: Path, how: str) -> Iterator[None]:
    """Another process holds SQLite's write lock until the block ends."""
    locker = subprocess.Popen([sys.executable, "-c", _LOCKER, str(db_path), how], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        yield
    finally:
        assert locker.stdin is not None and locker.stdout is not None
        locker.stdin.write("\n")
        locker.stdin.close()
        locker.wait(10)
        locker.stdout.close()


def _headers(server: ServerProcess) -> dict[str, str]:
    """What a request needs to be let in: empty in open mode, a bearer token where the server has tokens."""
    return dict(getattr(server, "headers", {}))


def _client(server: ServerProcess, tmp_path: Path) -> gradwatch.Run:
    token = _headers(server).get("Authorization", "").removeprefix("Bearer ") or None
    return gradwatch.init(project="faults", url=server.url, token=token, spool_dir=tmp_path / "spool", **CLIENT)


def _values(step: int) -> dict[str, Any]:
    return {"loss": 1.0 / (step + 1), "grad_norm": math.nan if step % 17 == 5 else 1.0 + step % 3}


def _log(run: gradwatch.Run, steps: range) -> None:
    for step in steps:
        run.log(step, **_values(step))
        run.log_layers(step, grad_norms={"a": 0.5, "b": math.inf if step == 3 else 0.25})


def _assert_stored_once(http: httpx.Client, run_id: str, n_steps: int) -> None:
    steps = http.get(f"/v1/runs/{run_id}/steps", params={"limit": 100_000}).json()["steps"]
    assert [s["step"] for s in steps] == list(range(n_steps))
    for s in steps:
        want = _values(s["step"])
        assert s["loss"] == want["loss"]
        assert s["grad_norm"] == ("NaN" if math.isnan(want["grad_norm"]) else want["grad_norm"])
    assert steps[3]["layer_grad_norms"] == [0.5, "Infinity"]


def _database_errors(http: httpx.Client) -> float:
    text = http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("gradwatch_database_errors_total{"))


def _outage_answers(http: httpx.Client, run_id: str, database: str) -> None:
    """What the service says while the database cannot take a write."""
    r = http.post(f"/v1/runs/{run_id}/steps", json={"steps": [{"step": 10_000, "loss": 1.0}]})
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1" and "database unavailable" in r.json()["detail"]
    ready = http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["database"] == database, ready.text
    assert ready.json()["status"] == "unavailable"
    assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("how", ["flock", "sqlite_only"])
def test_sqlite_locked_by_another_writer_is_a_503_and_the_client_delivers_later(tmp_path: Path, how: str) -> None:
    db = tmp_path / "locked.db"
    with ServerProcess(f"sqlite:///{db}", env=OUTAGE_ENV, log_path=tmp_path / "server.log") as server, \
            httpx.Client(base_url=server.url, headers=_headers(server), timeout=30) as http:
        run = _client(server, tmp_path)
        _log(run, range(0, 40))
        assert run.flush(10)
        errors_before = _database_errors(http)
        with write_locked(db, how):
            _outage_answers(http, run.run_id, "sqlite")
            _log(run, range(40, 120))
            assert not run.flush(1.5)  # the service keeps answering 503: the steps wait in the spool
            assert run.stats.spooled > 0
        assert _database_errors(http) > errors_before
        report = run.finish(timeout=20)
        assert report.lost == {} and report.spooled == 0 and report.delivered == report.steps == 120, report
        _assert_stored_once(http, run.run_id, 120)
        assert http.get("/readyz").status_code == 200


@pytest.mark.postgres
def test_postgresql_refusing_connections_is_a_503_and_the_client_delivers_later(tmp_path: Path) -> None:
    require_postgres()
    target = make_url(POSTGRES_ADMIN_URL)
    schema = PostgresSchema()
    try:
        with TcpProxy(target.port or 5432, target.host or "127.0.0.1") as proxy:
            url = schema.url.replace(f"@{target.host}:{target.port or 5432}/", f"@127.0.0.1:{proxy.port}/")
            assert url != schema.url
            with ServerProcess(url, env=OUTAGE_ENV, log_path=tmp_path / "server.log") as server, \
                    httpx.Client(base_url=server.url, headers=_headers(server), timeout=30) as http:
                run = _client(server, tmp_path)
                _log(run, range(0, 40))
                assert run.flush(10)
                # every pooled connection cut: the next checkout's ping notices and reconnects, nobody sees it
                assert proxy.cut() >= 1
                _log(run, range(40, 60))
                assert run.flush(10)
                errors_before = _database_errors(http)
                proxy.refuse()
                _outage_answers(http, run.run_id, "postgresql")
                _log(run, range(60, 140))
                assert not run.flush(1.5)
                assert run.stats.spooled > 0
                assert _database_errors(http) > errors_before
                proxy.restore()
                report = run.finish(timeout=20)
                assert report.lost == {} and report.spooled == 0 and report.delivered == report.steps == 140, report
                _assert_stored_once(http, run.run_id, 140)
                assert http.get("/readyz").status_code == 200
    finally:
        schema.drop()
