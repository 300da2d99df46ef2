"""The built-in pages: `/` lists runs, `/runs/{run_id}` shows one; `/ui/...` holds their data and static files.

A run page's charts read `/ui/runs/{run_id}/data`: the run, its latest incidents and its series through the
same `read_series` (and so the same rollup-backed downsampling) as `GET /v1/runs/{run_id}/series`, so a
10^6-step run costs what `max_points` asks for, not what the run holds.
"""

from __future__ import annotations

import urllib.parse
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import Field
from sqlalchemy import Connection, Engine
from starlette.concurrency import run_in_threadpool

from gradwatch.wire import LAYER_FIELDS, RUN_STATUSES, SCALAR_FIELDS

from ..api.deps import EngineDep, LimitsDep, RunIdPath, SettingsDep, model_response
from ..api.summaries import read_summaries
from ..auth.principal import Principal
from ..queries import get_run, get_run_row, list_incidents, read_series
from ..run_summaries import RunSummariesPublic
from ..schemas import Incident, RunPublic, Series, WireModel
from ..storage.db import read_connection
from .html import login_page, not_found_page, run_page, runs_page
from .session import (
    COOKIE,
    MAX_LOGIN_BODY_BYTES,
    check_same_origin,
    page_principal,
    principal_of_token,
    safe_next,
    secure_cookie,
)

__all__ = ["router", "RunPageData", "read_run_head", "read_run_page"]

router = APIRouter(include_in_schema=False)

PAGE_RUNS = 200
"""Runs the list page shows (newest first); its filters narrow them."""
PAGE_INCIDENTS = 100
"""Incidents a run page shows, most recently updated first."""
DEFAULT_POINTS = 1000
"""Points per series a run page asks for: about one per pixel column of a wide chart."""
MAX_POINTS = 4000
WEIGHT_POINTS = 200
"""Points per layer's weight norm (the update-to-weight ratio's denominator, read at the nearest step)."""
DEFAULT_LAYERS = 64
"""Layers the heatmap shows (root-cause layers first, then in the run's order); `max_layers` up to MAX_LAYERS."""
MAX_LAYERS = 256

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STATIC_FILES = {"run.js": "text/javascript", "runs.js": "text/javascript", "style.css": "text/css",
                "favicon.svg": "image/svg+xml"}


class RunPageData(WireModel):
    run: RunPublic
    max_points: int
    layers: list[str] = Field(description="the layers whose series are included (all, or max_layers of them)")
    root_cause: str | None = Field(description="the layer the most pressing incident names")
    series: list[Series]
    incidents: list[Incident]


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)


def _to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/login?" + urllib.parse.urlencode({"next": target}), status_code=303,
                            headers=SECURITY_HEADERS)


def _unauthorized() -> JSONResponse:
    return JSONResponse({"detail": "log in first: /login"}, status_code=401, headers=SECURITY_HEADERS)


def _logged_in(request: Request) -> bool:
    return COOKIE in request.cookies


def _status(status: str | None) -> str | None:
    """The filter form's status: one of the run statuses, else none (its "any" option sends an empty one)."""
    return status if status in RUN_STATUSES else None


@router.get("/")
async def runs_list(request: Request, engine: EngineDep, limits: LimitsDep, project: str | None = None,
                    status: str | None = None) -> Response:
    principal = await page_principal(request)
    if principal is None:
        return _to_login(request)
    listed = await run_in_threadpool(read_summaries, engine, principal.project, project or None, _status(status),
                                     None, PAGE_RUNS, 0, limits)
    return _html(runs_page(listed.runs, listed.count, project=project, status=_status(status),
                           logged_in=_logged_in(request)))


@router.get("/ui/runs")
async def runs_data(request: Request, engine: EngineDep, limits: LimitsDep, project: str | None = None,
                    status: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=PAGE_RUNS)] = PAGE_RUNS) -> Response:
    principal = await page_principal(request)
    if principal is None:
        return _unauthorized()
    listed: RunSummariesPublic = await run_in_threadpool(read_summaries, engine, principal.project,
                                                         project or None, _status(status), None, limit, 0,
                                                         limits)
    response = model_response(listed)
    response.headers.update(SECURITY_HEADERS)
    return response


@router.get("/runs/{run_id}")
async def run_view(run_id: RunIdPath, request: Request, engine: EngineDep) -> Response:
    principal = await page_principal(request)
    if principal is None:
        return _to_login(request)
    head = await run_in_threadpool(read_run_head, engine, principal, run_id)
    if head is None:
        return _html(not_found_page(run_id), 404)
    return _html(run_page(*head, max_points=DEFAULT_POINTS, logged_in=_logged_in(request)))


@router.get("/ui/runs/{run_id}/data")
async def run_data(run_id: RunIdPath, request: Request, engine: EngineDep,
                   max_points: Annotated[int, Query(ge=2, le=MAX_POINTS)] = DEFAULT_POINTS,
                   max_layers: Annotated[int, Query(ge=0, le=MAX_LAYERS)] = DEFAULT_LAYERS) -> Response:
    principal = await page_principal(request)
    if principal is None:
        return _unauthorized()
    data = await run_in_threadpool(read_run_page, engine, principal, run_id, max_points, max_layers)
    if data is None:
        raise HTTPException(404, f"run {run_id!r} does not exist")
    response = model_response(data)
    response.headers.update(SECURITY_HEADERS)
    return response


def _read_head(conn: Connection, principal: Principal, run_id: str) -> tuple[Any, RunPublic, list[Incident]] | None:
    row = get_run_row(conn, run_id)
    run = get_run(conn, run_id)
    if row is None or run is None or not principal.sees(row.project):
        return None
    incidents, _ = list_incidents(conn, run_pk=row.id, limit=PAGE_INCIDENTS)
    return row, run, incidents


def read_run_head(engine: Engine, principal: Principal, run_id: str) -> tuple[RunPublic, list[Incident]] | None:
    """The run and its latest incidents; None when the run is absent or another project's."""
    with read_connection(engine) as conn:
        head = _read_head(conn, principal, run_id)
    return None if head is None else (head[1], head[2])


def read_run_page(engine: Engine, principal: Principal, run_id: str, max_points: int,
                  max_layers: int) -> RunPageData | None:
    """What a run page draws; None when the run is absent or another project's."""
    with read_connection(engine) as conn:
        head = _read_head(conn, principal, run_id)
        if head is None:
            return None
        row, run, incidents = head
        layers = _chosen_layers(run.layers, [i.layer for i in incidents if i.layer], max_layers)
        series = read_series(conn, row.id, run.layers, fields=[*SCALAR_FIELDS, *LAYER_FIELDS[:1]], layers=layers,
                             start=None, end=None, max_points=max_points)
        if layers:  # weights move slowly: the ratio's denominator needs far fewer points than the heatmap
            series += read_series(conn, row.id, run.layers, fields=["layer_weight_norms"], layers=layers,
                                  start=None, end=None, max_points=min(max_points, WEIGHT_POINTS))
    return RunPageData(run=run, max_points=max_points, layers=layers, root_cause=_root_cause(incidents),
                       series=series, incidents=incidents)


def _root_cause(incidents: list[Incident]) -> str | None:
    """The layer of the open critical incident opened first, else of any open one, else of the latest."""
    ranked = sorted((i for i in incidents if i.layer),
                    key=lambda i: (i.status != "open", i.severity != "critical", i.opened_step))
    return ranked[0].layer if ranked else None


def _chosen_layers(names: list[str], causes: list[str], max_layers: int) -> list[str]:
    if len(names) <= max_layers:
        return names
    known = set(names)
    chosen = list(dict.fromkeys(c for c in causes if c in known))[:max_layers]
    for name in names:
        if len(chosen) >= max_layers:
            break
        if name not in chosen:
            chosen.append(name)
    order = {name: i for i, name in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


@router.get("/ui/static/{name}")
async def static_file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise HTTPException(404, "no such file")
    text = resources.files(__package__).joinpath("static", name).read_bytes()
    return Response(text, media_type=media_type, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


@router.get("/login")
async def login_form(request: Request, next: str | None = None) -> Response:  # noqa: A002 - the query's name
    return _html(login_page(next_path=safe_next(next)))


@router.post("/login")
async def login(request: Request, settings: SettingsDep) -> Response:
    if not check_same_origin(request):
        return _html(login_page(next_path="/", message="refused: the form was not sent from this site"), 403)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_LOGIN_BODY_BYTES:
        return _html(login_page(next_path="/", message="the form is too large"), 413)
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_LOGIN_BODY_BYTES:
            return _html(login_page(next_path="/", message="the form is too large"), 413)
    try:
        form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"), max_num_fields=4)
    except ValueError:  # more fields than a login form has
        return _html(login_page(next_path="/", message="that is not the login form"), 400)
    token = (form.get("token") or [""])[0].strip()
    next_path = safe_next((form.get("next") or ["/"])[0])
    if not token or await principal_of_token(request, token) is None:
        return _html(login_page(next_path=next_path, message="that token is not valid, or lacks the read scope"),
                     401)
    response = RedirectResponse(next_path, status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure_cookie(request), path="/")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    if not check_same_origin(request):
        return _html(login_page(next_path="/", message="refused: the form was not sent from this site"), 403)
    response = RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=secure_cookie(request))
    return response

