"""The exposure guard: while no token exists, the service answers only requests that came over loopback.

`gradwatch serve` refuses to listen beyond loopback without a token, but the app can be started by any launcher
(`uvicorn --factory gradwatch_service.app:create_app --host 0.0.0.0`, gunicorn, a container's entry point), and
behind a reverse proxy on the same machine even a loopback bind is reached from the network. So the app judges
each request by the address it came from (the peer, or the client a trusted proxy names in X-Forwarded-For,
as uvicorn reports it), not by the address it was told to bind: with no token, a request from anywhere but
loopback is refused with a 403 that says how to make a token, unless insecure mode (GRADWATCH_INSECURE,
`serve --insecure`) asks for the network to be served without tokens.
"""

from __future__ import annotations

import logging

from fastapi import HTTPException, Request

from .auth.principal import is_loopback

__all__ = ["INSECURE_WARNING", "NO_TOKEN_REFUSAL", "refuse_unless_local", "warn_if_insecure"]

log = logging.getLogger("gradwatch.exposure")

NO_TOKEN_REFUSAL = (
    "this service has no API token yet, so it answers only requests from its own machine (loopback). Make a "
    "token on its database (`gradwatch token create --name admin --scope admin`) and send it as "
    "`Authorization: Bearer gwt_...`, or start the service with --insecure (GRADWATCH_INSECURE=true) to serve "
    "the network without tokens")
INSECURE_WARNING = (
    "insecure mode (GRADWATCH_INSECURE / --insecure): while no API token exists, every route is open to anyone "
    "who can reach this service; make a token (`gradwatch token create --name admin --scope admin`) to close it")


def refuse_unless_local(request: Request, insecure: bool) -> None:
    """In open mode (no token exists): a 403 for a request that did not come over loopback, unless insecure."""
    if insecure:
        return
    client = request.client
    if client is None or not is_loopback(client.host):
        raise HTTPException(403, NO_TOKEN_REFUSAL)


def warn_if_insecure(insecure: bool) -> None:
    """Said once at start: insecure mode is a choice someone should see in the logs."""
    if insecure:
        log.warning(INSECURE_WARNING)
