"""Who is asking: the bearer token of a request checked against the tokens table, and what it may do.

The service is **open** (every route, no token) only while no unrevoked token exists *and* it listens on
loopback or was started `--insecure`; otherwise every route but /healthz and /readyz needs a token. Each process
reads the tokens table at most once per `GRADWATCH_AUTH_CACHE_SECONDS` (≤ 1 s) per token id, and as often
whether any token exists, so a token made or revoked on one replica holds on every replica within that second.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from dataclasses import dataclass

from sqlalchemy import Engine

from ..storage.db import read_connection
from .tokens import SCOPES, StoredToken, any_active_token, find_token, hash_token, parse_token

__all__ = ["OPEN", "Principal", "TokenCache", "is_loopback"]

_MAX_CACHED = 4096


@dataclass(frozen=True)
class Principal:
    """What a request may do: its scopes (admin includes ingest and read) and its project (None: every one)."""

    name: str
    scopes: frozenset[str]
    project: str | None
    token_id: str | None = None
    """the token's public id; None when the service is open"""

    def has(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def sees(self, project: str | None) -> bool:
        """May it touch this project's runs, incidents and webhooks? (None: the all-projects ones.)"""
        return self.project is None or project == self.project


OPEN = Principal("anyone (no token configured)", frozenset(SCOPES), None)
"""The principal of every request while the service is open."""


def is_loopback(host: str) -> bool:
    """A bind address only this machine can reach."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


class TokenCache:
    """The tokens table as this process knows it, never older than `ttl` seconds.

    Reads that hit the cache never touch the database (they run on the event loop); a miss reads one row by
    the token's public id (`refresh`, in a worker thread). Unknown ids are remembered too, so guessing costs the
    database at most one read per id and second; the cache is cleared when it reaches a few thousand ids.
    """

    def __init__(self, engine: Engine, ttl: float, always_required: bool) -> None:
        self._engine = engine
        self._ttl = ttl
        self._always_required = always_required
        self._required: tuple[float, bool] | None = None
        self._tokens: dict[str, tuple[float, StoredToken | None]] = {}

    def cached_required(self) -> bool | None:
        """Whether requests need a token, or None when that must be read again (`read_required`)."""
        if self._always_required:
            return True
        entry = self._required
        return entry[1] if entry is not None and time.monotonic() - entry[0] < self._ttl else None

    def read_required(self) -> bool:
        with read_connection(self._engine) as conn:
            required = any_active_token(conn)
        self._required = (time.monotonic(), required)
        return required or self._always_required

    def cached(self, token: str) -> tuple[bool, Principal | None]:
        """(found in the cache, its principal); (False, None) when `refresh` must read it."""
        token_id = parse_token(token)
        if token_id is None:
            return True, None
        entry = self._tokens.get(token_id)
        if entry is None or time.monotonic() - entry[0] >= self._ttl:
            return False, None
        return True, _principal(entry[1], token)

    def forget(self, token_id: str) -> None:
        """Read this token again at its next use, and whether any token is left (this process revoked it)."""
        self._tokens.pop(token_id, None)
        self._required = None

    def refresh(self, token: str) -> Principal | None:
        token_id = parse_token(token)
        if token_id is None:
            return None
        with read_connection(self._engine) as conn:
            stored = find_token(conn, token_id)
        if len(self._tokens) >= _MAX_CACHED:
            self._tokens.clear()
        self._tokens[token_id] = (time.monotonic(), stored)
        return _principal(stored, token)


def _principal(stored: StoredToken | None, token: str) -> Principal | None:
    """The token's principal when its hash matches (compared in constant time) and it is not revoked."""
    if stored is None or stored.revoked or not hmac.compare_digest(stored.secret_hash, hash_token(token)):
        return None
    return Principal(stored.name, stored.scopes, stored.project, stored.token_id)
