"""What every cron/admin endpoint that commands a worker shares (SPEC §2, §8, §9): the cron bearer
check, one `CommandClient` per gateway process, and turning a worker's reply (or its absence) into
the HTTP answer, always carrying this request's `request_id`.

Usage in a route module: `command_bus.install(app)` in `setup(app)`, then in a handler
`denied = require_cron(request)` and `return await dispatch(request, QUEUE, "name", args)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web

from services.gateway.context import SETTINGS, request_id
from services.gateway.responses import error_response, json_response
from shared.auth import AuthMisconfigured, bearer_token, cron_secret_matches
from shared.commands import CommandClient, CommandTimeout, CommandUnavailable, reply_http_status
from shared.logging import get_logger

log = get_logger("command_bus")

COMMAND_CLIENT = web.AppKey("command_client", CommandClient)
_INSTALLED = web.AppKey("command_bus_installed", bool)


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = CommandClient(settings.amqp_url, timeout_s=settings.command_timeout_s)
    await client.start()  # connects in the background: the gateway starts while the broker is down
    app[COMMAND_CLIENT] = client
    yield
    await client.close()


def install(app: web.Application) -> None:
    """Give the app its command client (once, however many route modules ask)."""
    if app.get(_INSTALLED):
        return
    app[_INSTALLED] = True
    app.cleanup_ctx.append(_client_ctx)


def require_cron(request: web.Request) -> web.Response | None:
    """None when `Authorization: Bearer $CRON_SECRET` matches (constant time); else the error answer:
    401 `unauthorized`, or 503 `cron_secret_unset` while CRON_SECRET is not configured."""
    token = bearer_token(request.headers.get("Authorization"))
    try:
        if cron_secret_matches(request.app[SETTINGS], token):
            return None
    except AuthMisconfigured:
        log.error("cron_secret_unset", request_id=request_id(request), path=request.path)
        return error_response(503, "cron_secret_unset", request_id=request_id(request))
    return error_response(401, "unauthorized", headers={"WWW-Authenticate": "Bearer"})


def reply_response(request: web.Request, reply: Mapping[str, Any]) -> web.Response:
    """A worker's reply as the HTTP answer: 200 with the body, or its error as `{ok: false, error}`."""
    rid = request_id(request)
    status = reply_http_status(reply)
    if status == 200:
        return json_response(200, {**reply, "request_id": rid})
    extra = {k: v for k, v in reply.items() if k not in ("ok", "error", "status", "request_id")}
    return error_response(status, str(reply.get("error") or "command_failed"), **extra, request_id=rid)


async def dispatch(
    request: web.Request, queue: str, name: str, args: Mapping[str, Any] | None = None
) -> web.Response:
    """Send command `name` to the worker on `queue`, wait up to COMMAND_TIMEOUT_S, answer with its reply.

    No reply in time → 504 `worker_timeout` (the command stays queued and still runs); broker not
    taking the command → 503 `broker_unavailable` (nothing queued)."""
    rid = request_id(request)
    client = request.app[COMMAND_CLIENT]
    try:
        reply = await client.call(queue, name, args or {}, request_id=rid)
    except CommandTimeout:
        log.warning("command_worker_timeout", request_id=rid, command=name, queue=queue)
        return error_response(504, "worker_timeout", request_id=rid)
    except CommandUnavailable as exc:
        log.warning("command_broker_unavailable", request_id=rid, command=name, error=str(exc))
        return error_response(503, "broker_unavailable", request_id=rid)
    return reply_response(request, reply)
