"""How a browser is let in: the same tokens as the API, typed once into a login form, kept in a cookie.

A browser cannot attach `Authorization: Bearer` to a page it navigates to, so `POST /login` checks the token
and answers with a cookie holding it: `HttpOnly` (the page's scripts never see it, so a script injected into
the page could not send it anywhere), `SameSite=Strict` (no other site's page, form or fetch makes the browser
send it), `Secure` when the service is reached over HTTPS, and no expiry (it ends with the browser session).
The token is checked again on every request through the same `TokenCache` as the API's, so a revoked token
stops working in the browser within the same second. The token never appears in a URL, and error pages never
repeat it.

Only the pages and their own data routes (`/`, `/runs/...`, `/ui/...`: reads) take the cookie; the `/v1` API
stays bearer-only, so no request a browser sends on its own (a cross-site form) can change anything. `POST
/login` and `POST /logout` also refuse requests whose `Origin` (or `Sec-Fetch-Site`) says another site sent
them (login CSRF).
"""

from __future__ import annotations

import urllib.parse

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..api.deps import app_state
from ..auth.principal import OPEN, Principal

__all__ = ["COOKIE", "MAX_LOGIN_BODY_BYTES", "check_same_origin", "page_principal", "principal_of_token",
           "safe_next", "secure_cookie"]

COOKIE = "gradwatch_token"
MAX_LOGIN_BODY_BYTES = 4096
"""A login form is one token and a path; anything longer is refused (413) unread."""


async def _auth_required(request: Request) -> bool:
    tokens = app_state(request).tokens
    required = tokens.cached_required()
    return required if required is not None else await run_in_threadpool(tokens.read_required)


async def principal_of_token(request: Request, token: str) -> Principal | None:
    """The token's principal if it is valid and may read, else None."""
    tokens = app_state(request).tokens
    hit, principal = tokens.cached(token)
    if not hit:
        principal = await run_in_threadpool(tokens.refresh, token)
    return principal if principal is not None and principal.has("read") else None


async def page_principal(request: Request) -> Principal | None:
    """Who is looking: OPEN while the service is open, else the principal of the bearer header or the session
    cookie (read scope needed), else None (the caller sends the browser to the login form, or answers 401)."""
    if not await _auth_required(request):
        return OPEN
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    token = credentials.strip() if scheme.lower() == "bearer" else request.cookies.get(COOKIE, "")
    return await principal_of_token(request, token) if token else None


def check_same_origin(request: Request) -> bool:
    """False when the browser says another site sent this request (a cross-site form post): by its
    `Sec-Fetch-Site` where it sends one (every current browser), else by its `Origin`. A request with neither
    comes from no browser, and so from no other site's page."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")


def secure_cookie(request: Request) -> bool:
    """Mark the cookie Secure when the browser reached us over HTTPS (directly, or as the external URL says)."""
    external = app_state(request).settings.external_url or ""
    return request.url.scheme == "https" or external.startswith("https://")


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site only (never `//host` or a scheme: no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
