"""Databases for tests: a fresh SQLite file or a fresh PostgreSQL schema, and what to do when PostgreSQL is missing.

PostgreSQL comes from GRADWATCH_TEST_POSTGRES (default: the local server, database `test`); each test works in
a schema of its own, dropped at the end. Where PostgreSQL is unreachable the tests skip, except with CI=true,
where that is a failure (tests/support/requirements.py).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from .requirements import unavailable

__all__ = ["BACKENDS", "POSTGRES_ADMIN_URL", "SERVER_MAX_BODY_BYTES", "PostgresSchema", "new_database_url",
           "new_run_id", "require_postgres"]

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
        unavailable(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}", problem)


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


def new_run_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
