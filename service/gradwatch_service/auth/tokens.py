"""API tokens: making them, and their storage (the `api_tokens` table) behind /v1/tokens and `gradwatch token`.

A token is `gwt_<id>_<secret>`: a public 12-hex-digit id (listed, used to look the token up and to revoke it) and
256 random bits. Only the SHA-256 of the whole token is stored. A slow password hash (bcrypt, argon2) guards
guessable secrets; this one is random and as long as the hash, so a plain hash is as strong and costs a
microsecond per request instead of tens of milliseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, insert, select, update

from ..storage.db import now_utc
from ..storage.dialect import aware_utc
from ..storage.models import api_tokens
from .schemas import Scope, TokenCreate, TokenCreated, TokenPublic

__all__ = ["SCOPES", "TOKEN_PREFIX", "StoredToken", "TokenRefused", "any_active_token", "create_token", "find_token",
           "hash_token", "list_tokens", "parse_token", "register_token", "revoke_token"]

SCOPES: tuple[Scope, ...] = ("ingest", "read", "admin")
TOKEN_PREFIX = "gwt_"
_ID_HEX = 12
_SECRET_BYTES = 32
_HEX = frozenset("0123456789abcdef")
_SECRET_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_MIN_SECRET_CHARS = 43
"""a secret of at least 256 bits: 43 base64url characters (token_urlsafe(32)), or 64 hex digits"""


class TokenRefused(ValueError):
    """A token given to `register_token` that is not well made, or whose id another token holds."""


@dataclass(frozen=True)
class StoredToken:
    """A row of `api_tokens`, as the request path needs it."""

    token_id: str
    name: str
    project: str | None
    scopes: frozenset[str]
    secret_hash: str
    revoked: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def parse_token(token: str) -> str | None:
    """The public id of something shaped like a gradwatch token, else None (nothing to look up)."""
    id_end = len(TOKEN_PREFIX) + _ID_HEX
    if not token.startswith(TOKEN_PREFIX) or len(token) < id_end + 2 or token[id_end] != "_":
        return None
    token_id = token[len(TOKEN_PREFIX):id_end]
    return token_id if _HEX.issuperset(token_id) else None




def _ordered(scopes: Iterable[str]) -> list[Scope]:
    wanted = set(scopes)
    return [s for s in SCOPES if s in wanted]


def _public(row: Any) -> TokenPublic:
    created = aware_utc(row.created_at)
    assert created is not None
    return TokenPublic(id=row.token_id, name=row.name, project=row.project, scopes=_ordered(row.scopes.split()),
                       created_at=created, revoked_at=None if row.revoked_at is None else aware_utc(row.revoked_at))


def create_token(conn: Connection, body: TokenCreate) -> TokenCreated:
    """A new token; the answer is the only place its secret ever appears."""
    token_id = secrets.token_hex(_ID_HEX // 2)
    token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    conn.execute(insert(api_tokens).values(
        token_id=token_id, name=body.name, project=body.project, scopes=" ".join(_ordered(body.scopes)),
        secret_hash=hash_token(token), created_at=now_utc(), revoked_at=None))
    row = conn.execute(select(api_tokens).where(api_tokens.c.token_id == token_id)).one()
    return TokenCreated(**_public(row).model_dump(), token=token)


def register_token(conn: Connection, body: TokenCreate, token: str) -> tuple[TokenPublic, bool]:
    """Store a token made elsewhere (a deployment's secret, e.g. `gwt_$(openssl rand -hex 6)_$(openssl rand -hex
    32)`), so a stack can start with a known admin token and no one reads one off a log. Idempotent: the same
    token again is the row already there (False: not new). Raises TokenRefused for a token that is not shaped
    `gwt_<12 hex>_<at least 43 of A-Z a-z 0-9 - _>`, or whose id is another token's or is revoked."""
    token_id = parse_token(token)
    secret = token[len(TOKEN_PREFIX) + _ID_HEX + 1:]
    if token_id is None or len(secret) < _MIN_SECRET_CHARS or not _SECRET_CHARS.issuperset(secret):
        raise TokenRefused(f"not a token this service would make: gwt_ + 12 lowercase hex digits + _ + at least "
                           f"{_MIN_SECRET_CHARS} of A-Z a-z 0-9 - _ (e.g. gwt_$(openssl rand -hex 6)_$(openssl rand "
                           "-hex 32))")
    row = conn.execute(select(api_tokens).where(api_tokens.c.token_id == token_id)).first()
    if row is None:
        conn.execute(insert(api_tokens).values(
            token_id=token_id, name=body.name, project=body.project, scopes=" ".join(_ordered(body.scopes)),
            secret_hash=hash_token(token), created_at=now_utc(), revoked_at=None))
        return _public(conn.execute(select(api_tokens).where(api_tokens.c.token_id == token_id)).one()), True
    if not hmac.compare_digest(row.secret_hash, hash_token(token)):
        raise TokenRefused(f"token id {token_id} is another token's")
    if row.revoked_at is not None:
        raise TokenRefused(f"token {token_id} was revoked: make a new one")
    return _public(row), False


def list_tokens(conn: Connection) -> list[TokenPublic]:
    """Every token, revoked ones too, oldest first; no secret or hash."""
    return [_public(r) for r in conn.execute(select(api_tokens).order_by(api_tokens.c.id))]


def find_token(conn: Connection, token_id: str) -> StoredToken | None:
    row = conn.execute(select(api_tokens).where(api_tokens.c.token_id == token_id)).first()
    if row is None:
        return None
    return StoredToken(token_id=row.token_id, name=row.name, project=row.project,
                       scopes=frozenset(row.scopes.split()), secret_hash=cast(str, row.secret_hash),
                       revoked=row.revoked_at is not None)


def revoke_token(conn: Connection, token_id: str) -> TokenPublic | None:
    """Revoke (idempotent: a revoked token keeps its first revocation time); None when there is no such token."""
    conn.execute(update(api_tokens).where(api_tokens.c.token_id == token_id, api_tokens.c.revoked_at.is_(None))
                 .values(revoked_at=now_utc()))
    row = conn.execute(select(api_tokens).where(api_tokens.c.token_id == token_id)).first()
    return None if row is None else _public(row)


def any_active_token(conn: Connection) -> bool:
    """Whether any token is unrevoked: the service then requires one on every route but /healthz and /readyz."""
    q = select(api_tokens.c.id).where(api_tokens.c.revoked_at.is_(None)).limit(1)
    return conn.execute(q).first() is not None
