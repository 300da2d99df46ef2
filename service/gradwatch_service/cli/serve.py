"""`gradwatch serve`: check the schema, then run uvicorn."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine

from ..settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (default: GRADWATCH_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: GRADWATCH_PORT or 8000)")
    parser.add_argument("--database-url", help="overrides GRADWATCH_DATABASE_URL")
    parser.add_argument("--workers", type=int, help="uvicorn worker processes (default: GRADWATCH_WORKERS or 1)")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--insecure", action="store_true",
                        help="listen beyond loopback with no token configured: every route open to the network")


@contextmanager
def configured_engine(database_url: str | None) -> Iterator[tuple[Settings, Engine]]:
    """Settings (a --database-url overrides GRADWATCH_DATABASE_URL, for this process and its workers) and an
    engine on them, disposed of on exit."""
    from ..storage.db import make_engine

    if database_url:
        os.environ["GRADWATCH_DATABASE_URL"] = database_url
    settings = Settings()
    engine = make_engine(settings.database_url, settings)
    try:
        yield settings, engine
    finally:
        engine.dispose()


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..storage.migrate import schema_problem

    with configured_engine(args.database_url) as (settings, engine):
        problem = schema_problem(engine)
        host = args.host or settings.host
        if not problem:
            problem = _exposure_problem(engine, host, args.insecure or settings.insecure)
    if problem:
        print(f"gradwatch serve: {problem}", file=sys.stderr)
        return 1
    os.environ["GRADWATCH_HOST"] = host  # the app (and each worker) knows whether it is reachable beyond loopback
    port = args.port if args.port is not None else settings.port
    os.environ["GRADWATCH_PORT"] = str(port)  # and its own URL (webhooks' externalURL) has the port it serves
    if args.insecure:
        os.environ["GRADWATCH_INSECURE"] = "true"
    workers = args.workers if args.workers is not None else settings.workers
    with metrics_directory(settings, workers):
        uvicorn.run(
            "gradwatch_service.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            access_log=args.access_log,
            log_level="info",
            timeout_graceful_shutdown=5,
        )
    return 0


def _exposure_problem(engine: Engine, host: str, insecure: bool) -> str | None:
    """Why this service must not listen on `host`: beyond loopback, with no token anyone could read and write
    every run."""
    from ..auth.principal import is_loopback
    from ..auth.tokens import any_active_token
    from ..storage.db import read_connection

    if is_loopback(host) or insecure:
        return None
    with read_connection(engine) as conn:
        if any_active_token(conn):
            return None
    return (f"refusing to listen on {host}: no API token exists, so anyone who can reach {host} could read and "
            "write every run. Make one first (`gradwatch token create --name admin --scope admin`), listen on "
            "loopback (--host 127.0.0.1), or pass --insecure to serve without tokens anyway")


@contextmanager
def metrics_directory(settings: Settings, workers: int) -> Iterator[None]:
    """With several workers, each keeps its metrics in prometheus-client's multiprocess directory, so a scrape
    answered by any one of them adds up all. Files left by an earlier server would count twice: start empty."""
    from ..alerting.metrics import MULTIPROC_ENV

    if workers <= 1 or not settings.metrics or os.environ.get(MULTIPROC_ENV):
        yield
        return
    own = settings.metrics_dir is None
    path = settings.metrics_dir or Path(tempfile.mkdtemp(prefix="gradwatch-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield
    finally:
        del os.environ[MULTIPROC_ENV]
        if own:
            shutil.rmtree(path, ignore_errors=True)
