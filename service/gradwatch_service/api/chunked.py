"""Large answers serialised an item at a time, so that the event loop keeps answering meanwhile.

pydantic serialises a model in one call that holds the GIL throughout: a /steps page near
GRADWATCH_MAX_RESPONSE_VALUES (a million values) held it for over 100 ms, and `/healthz` waited as long. Its
list serialised item by item hands the GIL over between items (a step, a series: at most a run's layers each).
"""

from __future__ import annotations

from pydantic import BaseModel
from starlette.responses import Response

__all__ = ["chunked_response"]


def chunked_response(model: BaseModel, field: str) -> Response:
    """`model` as JSON, its list `field` (its last field) serialised one item at a time."""
    items: list[BaseModel] = getattr(model, field)
    head = model.model_copy(update={field: []}).model_dump_json()
    empty = f'"{field}":[]}}'
    assert head.endswith(empty), f"{field} must be the model's last field"
    parts = [head[: -len(empty)].encode(), f'"{field}":['.encode()]
    for i, item in enumerate(items):
        if i:
            parts.append(b",")
        parts.append(item.model_dump_json().encode())
    parts.append(b"]}")
    return Response(b"".join(parts), media_type="application/json")
