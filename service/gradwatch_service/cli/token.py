"""`gradwatch token create|list|revoke`: API tokens, made and revoked directly on the database
(GRADWATCH_DATABASE_URL), so the first admin token needs no API and no token."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .serve import configured_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make a token and print it (shown only this once)")
    create.add_argument("--name", required=True, help="who or what holds it, for the list")
    create.add_argument("--scope", action="append", required=True, choices=("ingest", "read", "admin"),
                        dest="scopes", help="repeat for several; admin includes ingest and read")
    create.add_argument("--project", help="the one project it may touch (default: every project)")
    create.add_argument("--token-file", type=Path, metavar="PATH",
                        help="store the token in this file (made elsewhere: gwt_<12 hex>_<secret>) instead of making "
                             "one; nothing is printed, and the same file again changes nothing (a stack's start-up)")
    actions.add_parser("list", help="every token, revoked ones too; never a secret")
    revoke = actions.add_parser("revoke", help="revoke a token by its id: refused everywhere within a second")
    revoke.add_argument("token_id", metavar="ID", help="the token's public id (the part after gwt_)")
    for sub in (create, *actions.choices.values()):
        if not any(a.dest == "database_url" for a in sub._actions):
            sub.add_argument("--database-url", help="overrides GRADWATCH_DATABASE_URL")
            sub.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ..auth.schemas import TokenCreate
    from ..auth.tokens import TokenRefused, create_token, list_tokens, register_token, revoke_token
    from ..storage.db import read_connection, write_transaction

    with configured_engine(args.database_url) as (_settings, engine):
        if args.action == "create":
            try:
                body = TokenCreate(name=args.name, scopes=args.scopes, project=args.project)
            except ValidationError as exc:
                print(f"gradwatch token create: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}",
                      file=sys.stderr)
                return 2
            if args.token_file is not None:
                try:
                    token = args.token_file.read_text().strip()
                    with write_transaction(engine) as conn:
                        known, new = register_token(conn, body, token)
                except (OSError, TokenRefused) as exc:
                    print(f"gradwatch token create: {args.token_file}: {exc}", file=sys.stderr)
                    return 1
                print(known.model_dump_json() if args.json else
                      f"token {known.id} ({known.name}; {' '.join(known.scopes)}; project {known.project or 'all'}) "
                      f"{'stored' if new else 'was already stored'}", file=sys.stdout if args.json else sys.stderr)
                return 0
            with write_transaction(engine) as conn:
                created = create_token(conn, body)
            if args.json:
                print(created.model_dump_json())
            else:
                print(f"token {created.id} ({created.name}; {' '.join(created.scopes)}; project "
                      f"{created.project or 'all'}), shown only now:", file=sys.stderr)
                print(created.token)
            return 0
        if args.action == "list":
            with read_connection(engine) as conn:
                tokens = list_tokens(conn)
            if args.json:
                print(json.dumps([json.loads(t.model_dump_json()) for t in tokens]))
                return 0
            print(f"{'ID':<13} {'NAME':<24} {'SCOPES':<18} {'PROJECT':<16} {'CREATED':<20} REVOKED")
            for t in tokens:
                revoked = t.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if t.revoked_at else "-"
                print(f"{t.id:<13} {t.name[:24]:<24} {' '.join(t.scopes):<18} {(t.project or '*')[:16]:<16} "
                      f"{t.created_at.strftime('%Y-%m-%d %H:%M:%S'):<20} {revoked}")
            return 0
        with write_transaction(engine) as conn:
            revoked_token = revoke_token(conn, args.token_id)
        if revoked_token is None:
            print(f"gradwatch token revoke: no token {args.token_id}", file=sys.stderr)
            return 1
        print(revoked_token.model_dump_json() if args.json else f"token {revoked_token.id} revoked")
        return 0
