"""/v1/webhooks: subscriptions, their secrets and their delivery logs. Every route needs an admin token; one
bound to a project sees and makes only that project's subscriptions (another's, or an all-projects one, is a
404 to it), and a subscription to every project needs an all-projects admin token."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from ..alerting.schemas import (
    CREATE_EXAMPLE,
    UPDATE_EXAMPLE,
    DeliveriesPublic,
    DeliveryPublic,
    SecretPublic,
    SubscriptionCreate,
    SubscriptionCreated,
    SubscriptionPublic,
    SubscriptionsPublic,
    SubscriptionUpdate,
)
from ..alerting.subscriptions import (
    count_subscriptions,
    create_subscription,
    delete_subscription,
    get_delivery,
    get_subscription,
    list_deliveries,
    list_subscriptions,
    resend_delivery,
    rotate_secret,
    update_subscription,
)
from ..alerting.webhook_targets import TargetRefused, check_target
from ..auth.principal import Principal
from ..errors import InvalidInput
from ..storage.db import read_connection, write_transaction
from .deps import AUTH_RESPONSES, AdminToken, EngineDep, LimitsDep, SettingsDep, app_state, model_response
from .errors import INVALID

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=AUTH_RESPONSES)

SubId = Annotated[int, Path(ge=1, le=2**62)]


def _body_example(example: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"content": {"application/json": {"example": example}}}}


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such subscription"}}
REFUSED: dict[int | str, dict[str, Any]] = {422: {
    **INVALID[422], "description": "invalid body, an input limit passed (named with its setting), or a URL whose "
                                   "host resolves to a loopback, private, link-local or metadata address"}}


def _missing(sub_id: int) -> HTTPException:
    return HTTPException(404, f"webhook subscription {sub_id} does not exist")


def _visible(conn: Connection, sub_id: int, principal: Principal) -> SubscriptionPublic | None:
    """The subscription, when it is there and the token's to see."""
    sub = get_subscription(conn, sub_id)
    return sub if sub is not None and principal.sees(sub.project) else None


def _check_project(project: str | None, principal: Principal) -> None:
    if not principal.sees(project):
        raise HTTPException(403, f"this token may only subscribe to project {principal.project!r}")


async def _check_target(url: str | None, settings: SettingsDep) -> None:
    """Resolve the host and refuse non-public addresses (webhook_targets.py); a name that does not resolve yet
    passes, since every delivery resolves and checks again."""
    if url is None:
        return
    try:
        await run_in_threadpool(check_target, url, settings.webhook_target_policy())
    except TargetRefused as exc:
        raise InvalidInput(["body", "url"], f"webhook URL refused: {exc}") from None
    except OSError:
        pass


@router.post("", summary="Subscribe a receiver; the answer carries the signing secret, shown only this once",
             status_code=201, response_model=SubscriptionCreated, openapi_extra=_body_example(CREATE_EXAMPLE),
             responses={403: {"description": "the token's project is not the body's"}, **REFUSED})
async def post_subscription(body: SubscriptionCreate, engine: EngineDep, settings: SettingsDep,
                            limits: LimitsDep, principal: AdminToken) -> Response:
    limits.check_subscription(url=body.url, name=body.name)
    if body.project is None and principal.project is not None:
        body = body.model_copy(update={"project": principal.project})
    _check_project(body.project, principal)
    await _check_target(body.url, settings)

    def write() -> SubscriptionCreated:
        with write_transaction(engine) as conn:
            limits.check_subscription_count(count_subscriptions(conn))
            return create_subscription(conn, body)

    return model_response(await run_in_threadpool(write), 201)


@router.get("", summary="Every subscription (without secrets)", response_model=SubscriptionsPublic)
async def get_subscriptions(engine: EngineDep, principal: AdminToken) -> Response:
    def read() -> SubscriptionsPublic:
        with read_connection(engine) as conn:
            subs = [sub for sub in list_subscriptions(conn) if principal.sees(sub.project)]
        return SubscriptionsPublic(subscriptions=subs)

    return model_response(await run_in_threadpool(read))


@router.get("/{sub_id}", summary="One subscription", response_model=SubscriptionPublic, responses=NOT_FOUND)
async def get_one(sub_id: SubId, engine: EngineDep, principal: AdminToken) -> Response:
    def read() -> SubscriptionPublic | None:
        with read_connection(engine) as conn:
            return _visible(conn, sub_id, principal)

    sub = await run_in_threadpool(read)
    if sub is None:
        raise _missing(sub_id)
    return model_response(sub)


@router.patch("/{sub_id}", summary="Change URL, name, project filter, minimum severity or enabled",
              response_model=SubscriptionPublic, responses={**NOT_FOUND, **REFUSED},
              openapi_extra=_body_example(UPDATE_EXAMPLE))
async def patch_subscription(sub_id: SubId, body: SubscriptionUpdate, engine: EngineDep, settings: SettingsDep,
                             limits: LimitsDep, principal: AdminToken) -> Response:
    limits.check_subscription(url=body.url, name=body.name)
    if "project" in body.model_fields_set:
        _check_project(body.project, principal)
    await _check_target(body.url, settings)

    def write() -> SubscriptionPublic | None:
        with write_transaction(engine) as conn:
            if _visible(conn, sub_id, principal) is None:
                return None
            return update_subscription(conn, sub_id, body)

    sub = await run_in_threadpool(write)
    if sub is None:
        raise _missing(sub_id)
    return model_response(sub)


@router.delete("/{sub_id}", summary="Unsubscribe; pending deliveries and the log go too. Answers what was deleted",
               response_model=SubscriptionPublic, responses=NOT_FOUND)
async def delete_one(sub_id: SubId, engine: EngineDep, principal: AdminToken) -> Response:
    def write() -> SubscriptionPublic | None:
        with write_transaction(engine) as conn:
            sub = _visible(conn, sub_id, principal)
            if sub is not None:
                delete_subscription(conn, sub_id)
            return sub

    sub = await run_in_threadpool(write)
    if sub is None:
        raise _missing(sub_id)
    return model_response(sub)


@router.post("/{sub_id}/rotate-secret", summary="A new signing secret, shown only this once",
             response_model=SecretPublic, responses=NOT_FOUND)
async def post_rotate(sub_id: SubId, engine: EngineDep, principal: AdminToken) -> Response:
    def write() -> str | None:
        with write_transaction(engine) as conn:
            if _visible(conn, sub_id, principal) is None:
                return None
            return rotate_secret(conn, sub_id)

    secret = await run_in_threadpool(write)
    if secret is None:
        raise _missing(sub_id)
    return model_response(SecretPublic(secret=secret))


@router.get("/{sub_id}/deliveries", summary="The delivery log, newest first: every attempt's status and latency",
            response_model=DeliveriesPublic, responses=NOT_FOUND)
async def get_deliveries(sub_id: SubId, engine: EngineDep, principal: AdminToken,
                         state: Annotated[Literal["pending", "delivered", "dead"] | None, Query()] = None,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                         offset: Annotated[int, Query(ge=0, le=2**62)] = 0) -> Response:
    def read() -> DeliveriesPublic | None:
        with read_connection(engine) as conn:
            if _visible(conn, sub_id, principal) is None:
                return None
            rows, count = list_deliveries(conn, sub_id, state=state, limit=limit, offset=offset)
        return DeliveriesPublic(deliveries=rows, count=count)

    out = await run_in_threadpool(read)
    if out is None:
        raise _missing(sub_id)
    return model_response(out)


@router.post("/{sub_id}/deliveries/{delivery_id}/resend", response_model=DeliveryPublic,
             summary="Send a dead (or delivered) delivery again, with the same webhook-id and a fresh retry window",
             responses={404: {"description": "no such delivery"}, 409: {"description": "still pending"}})
async def post_resend(sub_id: SubId, delivery_id: Annotated[int, Path(ge=1, le=2**62)], request: Request,
                      engine: EngineDep, principal: AdminToken) -> Response:
    def write() -> tuple[str | None, DeliveryPublic | None]:
        with write_transaction(engine) as conn:
            if _visible(conn, sub_id, principal) is None:
                return None, None
            before = resend_delivery(conn, sub_id, delivery_id)
            return before, get_delivery(conn, sub_id, delivery_id)

    before, delivery = await run_in_threadpool(write)
    if before is None or delivery is None:
        raise HTTPException(404, f"delivery {delivery_id} of subscription {sub_id} does not exist")
    if before == "pending":
        raise HTTPException(409, f"delivery {delivery_id} is still pending: it will be retried on its own")
    worker = app_state(request).webhook_worker
    if worker is not None:
        worker.wake()
    return model_response(delivery)
