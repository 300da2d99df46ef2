"""The port this process serves on, as its requests show it, for the service's own URL in webhooks.

`gradwatch serve --port P` tells the app its port (GRADWATCH_PORT), but another launcher (`uvicorn --port P`,
gunicorn) does not: webhooks then named port 8000 (issue 22, finding 10). The ASGI scope of every request
carries the address of the socket it arrived on, so the app learns the real port from its first request (a
webhook is only ever caused by a request: an ingest batch). GRADWATCH_EXTERNAL_URL still overrides it all.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from .settings import Settings

__all__ = ["LearnServingPort", "ServedAt"]


class ServedAt:
    """Where this process is reached: the settings' URL, with the port its requests arrived on once one has."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port: int | None = None

    def public_url(self) -> str:
        s = self.settings
        return (s.external_url or f"http://{s.host}:{self.port or s.port}").rstrip("/")


class LearnServingPort:
    """ASGI middleware: the first request's local port goes into `served_at`; everything passes through."""

    def __init__(self, app: ASGIApp, served_at: ServedAt) -> None:
        self.app = app
        self.served_at = served_at

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.served_at.port is None and scope["type"] == "http":
            server = scope.get("server")
            if server is not None and server[1]:
                self.served_at.port = int(server[1])
        await self.app(scope, receive, send)
