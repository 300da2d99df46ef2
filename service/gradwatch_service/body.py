"""Reading request bodies safely: size caps before and after gzip, content-type and encoding checks.

The decompressed size is capped while inflating (zlib's max_length), so a gzip bomb costs at most the cap in
memory and gets a 413, never an out-of-memory kill.
"""

from __future__ import annotations

import json
import zlib
from types import ModuleType
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from gradwatch.wire import BINARY_CONTENT_TYPE

__all__ = ["BINARY_CONTENT_TYPE", "content_type_of", "nul_location", "parse_body", "read_body"]

_zlib: ModuleType
try:  # Intel ISA-L inflates about twice as fast as zlib: ingest is mostly inflate, parse, insert
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - optional speed-up
    _zlib = zlib
_INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, _zlib.error)


M = TypeVar("M", bound=BaseModel)
_JSON_TYPES = ("application/json", "application/x-ndjson")
_SETTING = "GRADWATCH_MAX_BODY_BYTES"


def content_type_of(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


async def read_body(request: Request, max_bytes: int, binary: bool = False) -> bytes:
    """The body, inflated, within `max_bytes` on the wire and inflated; `binary` also accepts binary batches."""
    content_type = content_type_of(request)
    if content_type not in _JSON_TYPES and not (binary and content_type == BINARY_CONTENT_TYPE):
        allowed = f"application/json or {BINARY_CONTENT_TYPE}" if binary else "application/json"
        raise HTTPException(415, f"Content-Type must be {allowed}, not {content_type!r}")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise HTTPException(415, f"Content-Encoding must be gzip or absent, not {encoding!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"request body is {declared} bytes; the limit is {max_bytes} bytes ({_SETTING})")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise HTTPException(413, f"request body is over {max_bytes} bytes, the limit ({_SETTING})")
        chunks.append(chunk)
    raw = b"".join(chunks)
    return gunzip_capped(raw, max_bytes) if encoding == "gzip" else raw


def _inflated_too_large(max_bytes: int) -> HTTPException:
    return HTTPException(413, f"decompressed request body is over {max_bytes} bytes, the limit ({_SETTING})")


def gunzip_capped(data: bytes, max_bytes: int) -> bytes:
    inflater = _zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, auto-detected
    try:
        out: bytes = inflater.decompress(data, max_bytes + 1)
        if len(out) > max_bytes or inflater.unconsumed_tail:
            raise _inflated_too_large(max_bytes)
        out += inflater.flush()
    except _INFLATE_ERRORS as exc:
        raise HTTPException(400, f"Content-Encoding is gzip but the body is not valid gzip: {exc}") from exc
    if len(out) > max_bytes:
        raise _inflated_too_large(max_bytes)
    if not inflater.eof:
        raise HTTPException(400, "gzip body is truncated")
    if inflater.unused_data:  # a second member, or junk: refused rather than silently dropped
        raise HTTPException(400, f"gzip body has {len(inflater.unused_data)} bytes after its end (a second "
                                 "gzip member or trailing data); send one gzip member")
    return out


def parse_body(model: type[M], raw: bytes) -> M:
    """Validate JSON bytes against a wire model; errors become FastAPI's 422 with the field's location."""
    try:
        parsed = model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        for e in errors:
            e["loc"] = ("body", *e["loc"])
        raise RequestValidationError(errors) from None
    if b"\\u0000" in raw:  # cheap pre-check; the walk below finds where, if anywhere
        where = nul_location(json.loads(raw), ["body"])
        if where is not None:
            raise RequestValidationError([{"loc": tuple(where), "type": "value_error",
                                           "msg": "strings may not contain NUL (\\u0000): no database stores it"}])
    return parsed


def nul_location(doc: Any, loc: list[Any]) -> list[Any] | None:
    if isinstance(doc, str):
        return loc if "\x00" in doc else None
    if isinstance(doc, dict):
        for k, v in doc.items():
            found = nul_location(k, loc + [k]) or nul_location(v, loc + [k])
            if found is not None:
                return found
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found = nul_location(v, loc + [i])
            if found is not None:
                return found
    return None
