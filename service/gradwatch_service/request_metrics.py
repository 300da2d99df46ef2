"""ASGI middleware that counts and times every HTTP request by its route template (`/v1/runs/{run_id}`).

Labelling by template, not by path, keeps one series per route however many runs exist; requests no route
matched share the label `unmatched`, so scanners probing random paths cannot create series.
"""

from __future__ import annotations

import time
from typing import Any

from .alerting.metrics import observe_request

__all__ = ["RequestMetrics"]


class RequestMetrics:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app fails before it starts a response

        async def send_and_note_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            observe_request(scope["method"], route, status, time.perf_counter() - start)
