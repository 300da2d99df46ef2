"""Shared dependencies of the routes, typed: the app state's engine, settings, detector config and ingest slots,
the run id in a path, and JSON responses."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Path, Request, Response
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from sqlalchemy import Engine

from gradwatch.detect import DetectorConfig
from gradwatch.wire import RUN_ID_PATTERN

from ..delivery import DeliveryWorker
from ..limits import InputLimits
from ..settings import Settings


class AppState:
    """What the app factory puts on `app.state`, read back with its types (Starlette's state is untyped)."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.detector = settings.detector_config()
        self.limits = InputLimits.from_settings(settings)
        # Batches are CPU work (inflate, parse) then a write that holds the database's lock. Letting every request
        # in at once only makes threads fight over the GIL (measured: 4 clients, 1 slot is 40 % faster than 4).
        self.ingest_slots = asyncio.Semaphore(settings.ingest_concurrency)
        self.webhook_worker: DeliveryWorker | None = None
        """This process's webhook sender, set while the app is being served with delivery on."""
        self.metrics_registry: CollectorRegistry | None = None
        """What /metrics serves, built at its first scrape."""


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.gradwatch
    return state


def get_engine(request: Request) -> Engine:
    return app_state(request).engine


def get_settings(request: Request) -> Settings:
    return app_state(request).settings


def get_detector(request: Request) -> DetectorConfig | None:
    return app_state(request).detector


def get_limits(request: Request) -> InputLimits:
    return app_state(request).limits


def get_ingest_slots(request: Request) -> asyncio.Semaphore:
    return app_state(request).ingest_slots


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
DetectorDep = Annotated[DetectorConfig | None, Depends(get_detector)]
"""The detector config batches are judged with; None when detection is off."""
LimitsDep = Annotated[InputLimits, Depends(get_limits)]
"""The input limits of the settings (limits.py)."""
IngestSlotsDep = Annotated[asyncio.Semaphore, Depends(get_ingest_slots)]
"""Batches processed at once by this process (GRADWATCH_INGEST_CONCURRENCY)."""
RunIdPath = Annotated[str, Path(pattern=RUN_ID_PATTERN, description="client-chosen run id",
                                examples=["resnet50-7f3a"])]


def model_response(model: BaseModel, status_code: int = 200) -> Response:
    """Serialise with pydantic directly (fast, and NaN/Infinity become their wire strings)."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")
