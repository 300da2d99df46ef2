"""`gradwatch db upgrade|downgrade|current|prune`: the schema, managed with the migrations shipped in the wheel, and
retention (old runs and settled webhook deliveries deleted)."""

from __future__ import annotations

import argparse
from datetime import timedelta

from sqlalchemy import Engine

from gradwatch.wire import RUN_STATUSES

from .serve import configured_engine


def _statuses(text: str) -> tuple[str, ...]:
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(set(chosen) - set(RUN_STATUSES))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown run status {', '.join(unknown) or '(none given)'}: "
                                         f"choose from {','.join(RUN_STATUSES)}")
    return chosen


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not days >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of days, 0 or more")
    return days


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..storage.retention import DEFAULT_STATUSES

    parser.add_argument("action", choices=("upgrade", "downgrade", "current", "prune"))
    parser.add_argument("revision", nargs="?", help="target revision (upgrade: head; downgrade: required)")
    parser.add_argument("--database-url", help="overrides GRADWATCH_DATABASE_URL")
    prune = parser.add_argument_group("prune", "delete runs (with their steps and incidents) last updated more "
                                               "than DAYS ago, and webhook deliveries settled that long ago")
    prune.add_argument("--older-than", type=_days, metavar="DAYS", help="age in days (required for prune)")
    prune.add_argument("--status", type=_statuses, default=DEFAULT_STATUSES, metavar="S1,S2",
                       help=f"only runs in these states (default: {','.join(DEFAULT_STATUSES)}; "
                            f"any of {','.join(RUN_STATUSES)})")
    prune.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")


def run(args: argparse.Namespace) -> int:
    from ..storage import migrate

    if args.action == "prune" and args.older_than is None:
        raise SystemExit("gradwatch db prune: give --older-than DAYS")
    with configured_engine(args.database_url) as (_settings, engine):
        shown = engine.url.render_as_string(hide_password=True)
        if args.action == "prune":
            return _prune(engine, shown, args)
        if args.action == "upgrade":
            migrate.upgrade(engine, args.revision or "head")
        elif args.action == "downgrade":
            if not args.revision:
                raise SystemExit("gradwatch db downgrade: give a revision (e.g. base, or -1)")
            migrate.downgrade(engine, args.revision)
        print(f"{shown}: at revision {migrate.current_revision(engine) or 'none'} (head {migrate.head_revision()})")
    return 0


def _prune(engine: Engine, shown: str, args: argparse.Namespace) -> int:
    from ..storage.db import now_utc
    from ..storage.migrate import schema_problem
    from ..storage.retention import prune

    problem = schema_problem(engine)
    if problem:
        raise SystemExit(f"gradwatch db prune: {problem}")
    before = now_utc() - timedelta(days=args.older_than)
    done = prune(engine, before=before, statuses=args.status, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{shown}: {verb} {done.runs} runs ({', '.join(args.status)}; last updated before "
          f"{before.isoformat(timespec='seconds')}) with {done.steps} steps and {done.incidents} incidents, "
          f"and {done.deliveries} settled webhook deliveries")
    return 0
