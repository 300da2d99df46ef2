"""`gradwatch db upgrade|downgrade|current`: the schema, managed with the migrations shipped in the wheel."""

from __future__ import annotations

import argparse

from .cli import configured_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("upgrade", "downgrade", "current"))
    parser.add_argument("revision", nargs="?", help="target revision (upgrade: head; downgrade: required)")
    parser.add_argument("--database-url", help="overrides GRADWATCH_DATABASE_URL")


def run(args: argparse.Namespace) -> int:
    from . import migrate

    with configured_engine(args.database_url) as (_settings, engine):
        if args.action == "upgrade":
            migrate.upgrade(engine, args.revision or "head")
        elif args.action == "downgrade":
            if not args.revision:
                raise SystemExit("gradwatch db downgrade: give a revision (e.g. base, or -1)")
            migrate.downgrade(engine, args.revision)
        shown = engine.url.render_as_string(hide_password=True)
        print(f"{shown}: at revision {migrate.current_revision(engine) or 'none'} (head {migrate.head_revision()})")
    return 0
