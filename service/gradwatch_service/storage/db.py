"""Engines for SQLite (embedded default) and PostgreSQL, with the connection settings each needs.

SQLite: WAL (readers never block the writer), `synchronous` from settings (FULL: an acknowledged batch
survives power loss), foreign keys on, and write transactions that take the write lock up front
(`BEGIN IMMEDIATE`) so two writers queue instead of failing halfway with SQLITE_BUSY.

Every wait for the database is bounded by `db_busy_timeout_s`: the SQLite writers' lock (`DatabaseBusy` past
it), SQLite's own busy timeout, PostgreSQL's connect timeout and pool wait (the driver's OperationalError or
SQLAlchemy's pool TimeoutError). The API answers all of them 503 with Retry-After (api/errors.py).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from ..settings import Settings

__all__ = ["DatabaseBusy", "make_engine", "write_transaction", "read_connection", "now_utc"]

_SQLITE_WRITE_LOCKS: dict[int, _WriterLock] = {}
_FLOCK_POLL_S = (0.0002, 0.0005)  # then every _FLOCK_POLL_MAX_S
_FLOCK_POLL_MAX_S = 0.001


class DatabaseBusy(Exception):
    """Another writer held SQLite's write lock longer than `db_busy_timeout_s` (a 503, api/errors.py)."""


class _WriterLock:
    """Queues SQLite writers: a thread lock within the process, an flock on `<db>.lock` across processes, each
    waited for at most `timeout` seconds (then `DatabaseBusy`).

    SQLite's own busy handler polls with growing sleeps (up to 100 ms), which wastes the database's time when
    several service workers write; the flock is polled every millisecond at most, so it changes hands within a
    millisecond of its release, and a writer that never lets go (another process, a stuck tool) costs a bounded
    wait instead of a hung request.
    """

    def __init__(self, path: str | None, timeout: float) -> None:
        self._thread_lock = threading.Lock()
        self._path = f"{path}.lock" if path else None
        self._fd: int | None = None
        self.timeout = timeout

    def __enter__(self) -> None:
        deadline = time.monotonic() + self.timeout
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise DatabaseBusy(f"this process's other writers held the write lock for {self.timeout:g} s")
        if self._path is not None:
            try:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                self._flock(deadline)
            except BaseException:
                self._thread_lock.release()
                raise

    def _flock(self, deadline: float) -> None:
        assert self._fd is not None
        polls = iter(_FLOCK_POLL_S)
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DatabaseBusy(f"another process held the write lock on {self._path} for "
                                       f"{self.timeout:g} s") from None
                time.sleep(min(left, next(polls, _FLOCK_POLL_MAX_S)))

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


def now_utc() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str, settings: Settings | None = None) -> Engine:
    settings = settings or Settings(database_url=url)
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        busy = settings.db_busy_timeout_s
        engine = create_engine(u, connect_args={"check_same_thread": False, "timeout": busy})
        _configure_sqlite(engine, settings.sqlite_synchronous, busy)
        on_disk = u.database if u.database and u.database != ":memory:" else None
        _SQLITE_WRITE_LOCKS[id(engine)] = _WriterLock(None if on_disk is None else str(Path(on_disk).expanduser()),
                                                      busy)
        return engine
    if u.get_backend_name() == "postgresql":
        # An unreachable server fails a request within the timeout instead of hanging it (a URL's own
        # connect_timeout wins); so does a pool that has no connection to give.
        connect_args = {} if "connect_timeout" in u.query else {"connect_timeout": max(1, round(
            settings.db_busy_timeout_s))}
        return create_engine(u, pool_size=settings.db_pool_size, max_overflow=settings.db_pool_size,
                             pool_pre_ping=True, pool_timeout=settings.db_busy_timeout_s, connect_args=connect_args)
    raise ValueError(f"unsupported database URL {u.render_as_string(hide_password=True)!r}: "
                     "use sqlite:///path.db or postgresql+psycopg://user@host/db")


def _configure_sqlite(engine: Engine, synchronous: str, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("gradwatch_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One write transaction, committed on exit. On SQLite, writers of this process queue on a lock first."""
    lock = _SQLITE_WRITE_LOCKS.get(id(engine))
    if lock is None:
        with engine.connect() as conn, conn.begin():
            yield conn
        return
    with lock, engine.connect().execution_options(gradwatch_write=True) as conn, conn.begin():
        yield conn


@contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn
