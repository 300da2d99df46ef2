"""`gradwatch db upgrade|downgrade|current`: the schema, managed with the migrations shipped in the wheel."""

from __future__ import annotations

import argparse
import os

from .settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("upgrade", "downgrade", "current"))
    parser.add_argument("revision", nargs="?", help="target revision (upgrade: head; downgrade: required)")
    parser.add_argument("--database-url", help="overrides GRADWATCH_DATABASE_URL")


def run(args: argparse.Namespace) -> int:
    from . import migrate
    from .db import make_engine

    if args.database_url:
        os.environ["GRADWATCH_DATABASE_URL"] = args.database_url
    settings = Settings()
    engine = make_engine(settings.database_url, settings)
    try:
        if args.action == "upgrade":
            migrate.upgrade(engine, args.revision or "head")
        elif args.action == "downgrade":
            if not args.revision:
                raise SystemExit("gradwatch db downgrade: give a revision (e.g. base, or -1)")
            migrate.downgrade(engine, args.revision)
        shown = engine.url.render_as_string(hide_password=True)
        print(f"{shown}: at revision {migrate.current_revision(engine) or 'none'} "
              f"(head {migrate.head_revision()})")
    finally:
        engine.dispose()
    return 0
