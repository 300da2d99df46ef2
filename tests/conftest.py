"""Shared fixtures: every storage test runs on a real SQLite file and a real PostgreSQL (tests/support/databases.py),
and every API test talks to a real uvicorn server on a loopback port (tests/support/serverproc.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from gradwatch_service.storage.db import make_engine
from gradwatch_service.storage.migrate import upgrade

from .support.databases import BACKENDS, SERVER_MAX_BODY_BYTES, new_database_url
from .support.serverproc import ServerProcess

# a test that asks for any of these needs the service or its database, so `make test-fast` leaves it out
SERVICE_FIXTURES = frozenset({"database_url", "server", "live_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)


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


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    """An HTTP client on the session server of each backend, sending its token (`server.headers`) if it has one."""
    with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as client:
        yield client

