"""The reading side of the service for the command line (`gradwatch runs`, `show`, `tail`, `export`, `import`):
the URL and token taken as the client takes them (`--url`/`GRADWATCH_URL`, `GRADWATCH_TOKEN`), one keep-alive
connection (the sender's `HttpTransport`), JSON answers, and errors as sentences.
"""

from __future__ import annotations

import argparse
import os
import time
import urllib.parse
from typing import Any

from ._batch import StepBatch
from ._options import DEFAULT_URL
from ._transport import HttpTransport, Response, TransportError

__all__ = ["Service", "ServiceError", "add_connection_arguments", "service_from_args"]


class ServiceError(Exception):
    """The service could not be reached, or answered with an error: the message says which, for a person."""


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help=f"service URL (default: $GRADWATCH_URL, else {DEFAULT_URL})")
    parser.add_argument("--token", default=None,
                        help="bearer token (default: $GRADWATCH_TOKEN; prefer the variable: an option is visible "
                             "to anyone who can list this machine's processes)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request (default 10)")


def service_from_args(args: argparse.Namespace) -> Service:
    """The service the arguments name, with the token `--token` or `GRADWATCH_TOKEN` gives."""
    url = args.url or os.environ.get("GRADWATCH_URL") or DEFAULT_URL
    return Service(url, args.token or os.environ.get("GRADWATCH_TOKEN") or None, args.timeout)


class Service:
    """GETs and writes against one service; an answer that is not 2xx is a `ServiceError` naming the request."""

    RETRIES = 5
    """Tries of a write answered 429 or 503 (it waits the answer's Retry-After, at most 10 s, in between)."""

    def __init__(self, url: str, token: str | None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        try:
            self._transport = HttpTransport(url, token, timeout, compress=True, binary=True)
        except ValueError as exc:
            raise ServiceError(str(exc)) from None

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, **query: Any) -> Any:
        """The JSON answer of a GET; query values that are None are left out."""
        shown = {k: v for k, v in query.items() if v is not None}
        full = path + ("?" + urllib.parse.urlencode(shown) if shown else "")
        return self._checked("GET", full, self._call(lambda: self._transport.request("GET", full), "GET", full))

    def put(self, path: str, payload: dict[str, Any]) -> Any:
        return self._checked("PUT", path, self._write(lambda: self._transport.request("PUT", path, payload),
                                                      "PUT", path))

    def post_steps(self, run_id: str, body: dict[str, Any]) -> Any:
        """One JSON-shaped step batch, sent as binary columns (JSON to a service that takes only JSON)."""
        path = f"/v1/runs/{run_id}/steps"
        batch = StepBatch.from_body(body)
        return self._checked("POST", path, self._write(lambda: self._transport.post_steps(path, batch),
                                                       "POST", path))

    def _call(self, send: Any, method: str, path: str) -> Response:
        try:
            response: Response = send()
        except TransportError as exc:
            raise ServiceError(f"cannot reach the service at {self.url} ({method} {path}): {exc}") from None
        return response

    def _write(self, send: Any, method: str, path: str) -> Response:
        for attempt in range(self.RETRIES):
            response = self._call(send, method, path)
            if response.status not in (429, 503) or attempt == self.RETRIES - 1:
                return response
            time.sleep(min(10.0, response.retry_after or 1.0))
        raise AssertionError("unreachable")

    def _checked(self, method: str, path: str, response: Response) -> Any:
        if 200 <= response.status < 300:
            return response.body
        detail = response.body.get("detail") if isinstance(response.body, dict) else response.body
        if response.status == 401:
            hint = " (set GRADWATCH_TOKEN to a token with the read scope, or ingest to import)"
        elif response.status == 403:
            hint = " (the token lacks the scope, or may not see this project)"
        else:
            hint = ""
        raise ServiceError(f"{method} {path}: HTTP {response.status}: {_sentence(detail)}{hint}")


def _sentence(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI's [{loc, msg, type}, ...]
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" if isinstance(d, dict)
                         else str(d) for d in detail[:5])
    if isinstance(detail, dict):
        return str(detail.get("message") or detail)
    return str(detail)
