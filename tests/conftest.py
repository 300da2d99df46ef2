"""Shared fixtures: every storage test runs on a real SQLite file and a real PostgreSQL.

PostgreSQL comes from GRADWATCH_TEST_POSTGRES (default: the local server, database `test`); each test session
works in schemas of its own, dropped at the end. Where PostgreSQL is unreachable the tests skip, except with
CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from gradwatch_service.db import make_engine
from gradwatch_service.migrate import upgrade

from .serverproc import ServerProcess

POSTGRES_ADMIN_URL = os.environ.get("GRADWATCH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgres"]
SERVER_MAX_BODY_BYTES = 1 << 20  # the session servers' body cap, small enough to test cheaply


def _postgres_available() -> str | None:
    try:
        eng = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))
        eng.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - the reason goes into the skip/fail message
        return f"{type(exc).__name__}: {exc}"


_PG_PROBLEM: list[str | None] = []


def require_postgres() -> None:
    if not _PG_PROBLEM:
        _PG_PROBLEM.append(_postgres_available())
    problem = _PG_PROBLEM[0]
    if problem:
        msg = f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {problem}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(msg)


class PostgresSchema:
    """A fresh schema in the test database, reached through a URL whose search_path points at it."""

    def __init__(self) -> None:
        self.name = f"gw_test_{uuid.uuid4().hex[:12]}"
        admin = create_engine(POSTGRES_ADMIN_URL)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{self.name}"'))
        admin.dispose()
        sep = "&" if "?" in POSTGRES_ADMIN_URL else "?"
        self.url = f"{POSTGRES_ADMIN_URL}{sep}options=-csearch_path%3D{self.name}"

    def drop(self) -> None:
        admin = create_engine(POSTGRES_ADMIN_URL)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE'))
        admin.dispose()


def new_database_url(backend: str, tmp_dir: Path) -> tuple[str, PostgresSchema | None]:
    if backend == "sqlite":
        return f"sqlite:///{tmp_dir / f'gw-{uuid.uuid4().hex[:8]}.db'}", None
    require_postgres()
    schema = PostgresSchema()
    return schema.url, schema


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (no schema yet) on each backend."""
    url, schema = new_database_url(request.param, tmp_path)
    yield url
    if schema:
        schema.drop()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated database on each backend."""
    eng = make_engine(database_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real uvicorn server on a loopback port, one per backend for the whole session."""
    url, schema = new_database_url(request.param, tmp_path_factory.mktemp(request.param))
    proc = ServerProcess(url, env={"GRADWATCH_MAX_BODY_BYTES": str(SERVER_MAX_BODY_BYTES)},
                         log_path=tmp_path_factory.mktemp("logs") / f"server-{request.param}.log")
    proc.start()
    yield proc
    proc.stop()
    if schema:
        schema.drop()


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of its own on a fresh SQLite file, for tests that kill or restart it."""
    proc = ServerProcess(f"sqlite:///{tmp_path / 'live.db'}", log_path=tmp_path / "server.log")
    proc.start()
    yield proc
    proc.stop()


def new_run_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
