"""The wire shapes of /v1/tokens: a token as listed (never its secret) and, once, as created (with it)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints

from ..schemas import ProjectName, WireModel

__all__ = ["CREATE_EXAMPLE", "Scope", "TokenCreate", "TokenCreated", "TokenPublic", "TokensPublic"]

Scope = Literal["ingest", "read", "admin"]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]

_TOKEN = {"id": "3f9a1c2b7d4e", "name": "trainer-vision", "project": "vision", "scopes": ["ingest"],
          "created_at": "2026-12-02T19:00:00Z", "revoked_at": None}
_SECRET = "gwt_3f9a1c2b7d4e_q0cXb7b2Zq6n3mJ9V8Yp1T4kR5sW2xL0aH6dF3gN9uE"
CREATE_EXAMPLE = {"name": "trainer-vision", "scopes": ["ingest"], "project": "vision"}


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class TokenCreate(WireModel):
    name: Name = Field(description="who or what holds it, for the list")
    scopes: list[Scope] = Field(min_length=1, max_length=3, description="ingest, read, admin (admin implies both)")
    project: ProjectName | None = Field(default=None, description="the one project it may touch; all when absent")

    model_config = _examples(CREATE_EXAMPLE)


class TokenPublic(WireModel):
    id: str = Field(description="the token's public id: the part after `gwt_`; revoke with it")
    name: str
    project: str | None
    scopes: list[Scope]
    created_at: datetime
    revoked_at: datetime | None

    model_config = _examples(_TOKEN)


class TokenCreated(TokenPublic):
    token: str = Field(description="gwt_<id>_<secret>: send it as `Authorization: Bearer ...`; shown only now")

    model_config = _examples({**_TOKEN, "token": _SECRET})


class TokensPublic(WireModel):
    tokens: list[TokenPublic]

    model_config = _examples({"tokens": [_TOKEN]})
