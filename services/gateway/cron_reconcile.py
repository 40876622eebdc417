"""Reconciliation cron endpoints (SPEC §8): each one commands the reconciler over RabbitMQ and answers
with its reply and this request's `request_id` (504 `worker_timeout` when no reconciler answers in
COMMAND_TIMEOUT_S; the command stays queued and still runs)."""

from __future__ import annotations

import asyncpg
import orjson
from aiohttp import web

from services.gateway import command_bus
from services.gateway.bodies import read_body
from services.gateway.command_bus import dispatch, require_cron
from services.gateway.context import CONTEXT, request_id
from services.gateway.responses import error_response
from shared.amqp import RECONCILER_QUEUE
from shared.logging import get_logger
from shared.queries import query
from shared.reconciliation import BackfillInvalid, parse_backfill_request

log = get_logger("cron_reconcile")

MAX_BODY_BYTES = 16 * 1024
_DB_ERRORS = (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


async def reconcile_usage(request: web.Request) -> web.Response:
    """Enqueue, then run up to 50: `{ok, enqueued, processed, completed, failed, request_id}`."""
    if denied := require_cron(request):
        return denied
    return await dispatch(request, RECONCILER_QUEUE, "reconcile_usage")


async def reconcile_enqueue(request: web.Request) -> web.Response:
    """`{ok, enqueued, sites, request_id}`."""
    if denied := require_cron(request):
        return denied
    return await dispatch(request, RECONCILER_QUEUE, "enqueue")


async def reconcile_run(request: web.Request) -> web.Response:
    """`{ok, processed, completed, failed, request_id}`."""
    if denied := require_cron(request):
        return denied
    return await dispatch(request, RECONCILER_QUEUE, "run")


def _invalid(request: web.Request, code: str, reason: str) -> web.Response:
    return error_response(400, code, reason=reason, request_id=request_id(request))


async def reconcile_backfill(request: web.Request) -> web.Response:
    """Body `{site_id?, from, to}`; validated here (400 with a reason) before the reconciler sees it,
    and again by the reconciler. `{ok, enqueued, months, sites, request_id}`."""
    if denied := require_cron(request):
        return denied
    raw = await read_body(request, MAX_BODY_BYTES)
    if len(raw) > MAX_BODY_BYTES:
        return error_response(413, "payload_too_large", request_id=request_id(request))
    try:
        body = orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        return _invalid(request, "invalid_json", "body is not valid JSON")
    try:
        backfill = parse_backfill_request(body)
    except BackfillInvalid as exc:
        return _invalid(request, exc.code, exc.reason)
    if backfill.site_id is not None:
        try:
            exists = await request.app[CONTEXT].pool.fetchval(
                query("reconcile_site_exists"), backfill.site_id, timeout=3
            )
        except _DB_ERRORS as exc:
            log.warning("backfill_site_check_failed", request_id=request_id(request), error=repr(exc))
            return error_response(503, "database_unavailable", request_id=request_id(request))
        if not exists:
            return _invalid(request, "unknown_site", "no site with that site_id")
    args = {"from": backfill.months[0], "to": backfill.months[-1]}
    if backfill.site_id is not None:
        args["site_id"] = str(backfill.site_id)
    return await dispatch(request, RECONCILER_QUEUE, "backfill", args)


def setup(app: web.Application) -> None:
    command_bus.install(app)
    # GET because SPEC §8 says so; no HEAD, which must not run jobs.
    app.router.add_get("/api/cron/reconcile-usage", reconcile_usage, allow_head=False)
    app.router.add_get("/api/cron/reconcile-usage/enqueue", reconcile_enqueue, allow_head=False)
    app.router.add_post("/api/cron/reconcile-usage/run", reconcile_run)
    app.router.add_post("/api/cron/reconcile-usage/backfill", reconcile_backfill)
