"""`GET /api/cron/watchtower` (SPEC §11): computed here from Postgres (reads only) and the fleet counters."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from services.gateway.command_bus import require_cron
from services.gateway.context import CONTEXT, request_id
from services.gateway.responses import error_response, json_response
from shared.logging import get_logger
from shared.watchtower import build_watchtower

log = get_logger("watchtower")

_DB_ERRORS = (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


async def watchtower(request: web.Request) -> web.Response:
    if denied := require_cron(request):
        return denied
    ctx = request.app[CONTEXT]
    rid = request_id(request)
    try:
        report = await build_watchtower(ctx.pool, ctx.counters)
    except _DB_ERRORS as exc:
        log.warning("watchtower_failed", request_id=rid, error=str(exc) or type(exc).__name__)
        return error_response(503, "database_unavailable", request_id=rid)
    if report["status"] != "ok":
        log.warning("watchtower_degraded", request_id=rid, checks=report["checks"])
    return json_response(200, {**report, "request_id": rid})


def setup(app: web.Application) -> None:
    app.router.add_get("/api/cron/watchtower", watchtower)
