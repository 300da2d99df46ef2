"""Shared dependencies of the routes, typed: the app state's engine, settings, detector config and ingest slots,
who is asking (`IngestToken`, `ReadToken`, `AdminToken`, `MetricsAccess`), the run id in a path, and JSON
responses."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from gradwatch.detect import DetectorConfig
from gradwatch.wire import RUN_ID_PATTERN

from ..alerting.delivery import DeliveryWorker
from ..auth.principal import OPEN, Principal, TokenCache, is_loopback
from ..exposure import refuse_unless_local
from ..limits import InputLimits
from ..settings import Settings
from ..storage.rollup_worker import RollupWorker


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
        self.rollup_worker: RollupWorker | None = None
        """This process's rollup worker, set while the app is being served: ingest leaves the rollups to it."""
        self.metrics_registry: CollectorRegistry | None = None
        """What /metrics serves, built at its first scrape."""
        self.tokens = TokenCache(engine, settings.auth_cache_seconds,
                                 always_required=not is_loopback(settings.host) and not settings.insecure)
        """Bound beyond loopback without --insecure, a token is required even while none exists."""
        self.scrape_token = settings.scrape_token()
        """/metrics' own token (GRADWATCH_METRICS_TOKEN or _FILE), read once."""


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
bearer = HTTPBearer(auto_error=False, scheme_name="token", description=(
    "a gradwatch token, `gwt_<id>_<secret>` (`gradwatch token create`, POST /v1/tokens), with the route's scope: "
    "ingest, read or admin. Not needed while the service is open (no token exists, loopback only)"))
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "no token, or not a valid one (unknown, revoked, mistyped)"},
    403: {"description": "the token lacks this route's scope, or may not act on this project"},
}
"""What every route behind a token may also answer (its router declares them)."""


async def _token_principal(tokens: TokenCache, token: str) -> Principal | None:
    hit, principal = tokens.cached(token)
    return principal if hit else await run_in_threadpool(tokens.refresh, token)


async def _auth_required(tokens: TokenCache) -> bool:
    required = tokens.cached_required()
    return required if required is not None else await run_in_threadpool(tokens.read_required)


async def current_principal(request: Request, credentials: BearerCredentials) -> Principal:
    """Who is asking: OPEN while the service is open, else the bearer token's principal or a 401. Error bodies
    never repeat what was sent."""
    state = app_state(request)
    tokens = state.tokens
    if not await _auth_required(tokens):
        refuse_unless_local(request, state.settings.insecure)  # open, but only to this machine
        return OPEN
    if credentials is None:
        raise HTTPException(401, "a token is required: send `Authorization: Bearer gwt_...`", _UNAUTHORIZED)
    principal = await _token_principal(tokens, credentials.credentials)
    if principal is None:
        raise HTTPException(401, "the token is not valid: unknown, revoked or mistyped", _UNAUTHORIZED)
    return principal


def _requiring(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    async def require(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not principal.has(scope):
            raise HTTPException(403, f"this token lacks the {scope!r} scope")
        return principal

    require.__name__ = f"require_{scope}"
    return require


IngestToken = Annotated[Principal, Depends(_requiring("ingest"))]
"""PUT a run, POST its steps (and read back what those answers carry). admin includes it."""
ReadToken = Annotated[Principal, Depends(_requiring("read"))]
"""The GET routes of runs, steps, series and incidents. admin includes it."""
AdminToken = Annotated[Principal, Depends(_requiring("admin"))]
"""Webhooks and tokens."""


def all_projects(principal: Principal) -> None:
    """Some things span every project (tokens, null-project webhooks, /metrics): a project's token gets a 403."""
    if principal.project is not None:
        raise HTTPException(403, f"this token is bound to project {principal.project!r}; this needs an "
                                 "all-projects token")


async def metrics_access(request: Request, credentials: BearerCredentials) -> None:
    """/metrics takes GRADWATCH_METRICS_TOKEN (Prometheus' own credentials) or an all-projects read token. Open
    without either while the service is open and no metrics token is set."""
    state = app_state(request)
    presented = credentials.credentials if credentials is not None else None
    if state.scrape_token is not None:
        if presented is not None and hmac.compare_digest(presented.encode(), state.scrape_token.encode()):
            return
    elif not await _auth_required(state.tokens):
        refuse_unless_local(request, state.settings.insecure)
        return
    if presented is None:
        raise HTTPException(401, "/metrics needs its token (GRADWATCH_METRICS_TOKEN) or a read token",
                            _UNAUTHORIZED)
    principal = await _token_principal(state.tokens, presented)
    if principal is None:
        raise HTTPException(401, "the token is not valid: unknown, revoked or mistyped", _UNAUTHORIZED)
    if not principal.has("read"):
        raise HTTPException(403, "this token lacks the 'read' scope")
    all_projects(principal)


MetricsAccess = Depends(metrics_access)

RunIdPath = Annotated[str, Path(pattern=RUN_ID_PATTERN, description="client-chosen run id",
                                examples=["resnet50-7f3a"])]


def model_response(model: BaseModel, status_code: int = 200) -> Response:
    """Serialise with pydantic directly (fast, and NaN/Infinity become their wire strings)."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")
