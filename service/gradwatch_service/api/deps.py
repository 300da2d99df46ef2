"""Shared dependencies of the routes: the app state's engine and settings, and JSON responses."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response
from pydantic import BaseModel
from sqlalchemy import Engine

from ..settings import Settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def model_response(model: BaseModel, status_code: int = 200) -> Response:
    """Serialise with pydantic directly (fast, and NaN/Infinity become their wire strings)."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")
