"""/v1/tokens: make, list and revoke API tokens. Every route needs an all-projects admin token (a project's
admin token could otherwise mint one for every project). `gradwatch token` does the same on the database, for
the first token."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from ..auth.schemas import CREATE_EXAMPLE, TokenCreate, TokenCreated, TokenPublic, TokensPublic
from ..auth.tokens import create_token, list_tokens, revoke_token
from ..storage.db import read_connection, write_transaction
from .deps import AUTH_RESPONSES, AdminToken, EngineDep, all_projects, app_state, model_response

router = APIRouter(prefix="/v1/tokens", tags=["tokens"], responses=AUTH_RESPONSES)

TokenIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", description="the token's public id",
                                  examples=["3f9a1c2b7d4e"])]
_FORBIDDEN: dict[int | str, dict[str, Any]] = {403: {"description": "not an all-projects admin token"}}


@router.post("", summary="Make a token; the answer carries it, shown only this once", status_code=201,
             response_model=TokenCreated, responses=_FORBIDDEN,
             openapi_extra={"requestBody": {"content": {"application/json": {"example": CREATE_EXAMPLE}}}})
async def post_token(body: TokenCreate, request: Request, engine: EngineDep, principal: AdminToken) -> Response:
    all_projects(principal)

    def write() -> TokenCreated:
        with write_transaction(engine) as conn:
            return create_token(conn, body)

    created = await run_in_threadpool(write)
    app_state(request).tokens.forget(created.id)
    return model_response(created, 201)


@router.get("", summary="Every token, revoked ones too (never a secret)", response_model=TokensPublic,
            responses=_FORBIDDEN)
async def get_tokens(engine: EngineDep, principal: AdminToken) -> Response:
    all_projects(principal)

    def read() -> TokensPublic:
        with read_connection(engine) as conn:
            return TokensPublic(tokens=list_tokens(conn))

    return model_response(await run_in_threadpool(read))


@router.delete("/{token_id}", summary="Revoke a token: refused by every replica within a second",
               response_model=TokenPublic, responses={**_FORBIDDEN, 404: {"description": "no such token"}})
async def delete_token(token_id: TokenIdPath, request: Request, engine: EngineDep, principal: AdminToken) -> Response:
    all_projects(principal)

    def write() -> TokenPublic | None:
        with write_transaction(engine) as conn:
            return revoke_token(conn, token_id)

    token = await run_in_threadpool(write)
    app_state(request).tokens.forget(token_id)  # this process refuses it at once; the others within a second
    if token is None:
        raise HTTPException(404, f"token {token_id} does not exist")
    return model_response(token)
