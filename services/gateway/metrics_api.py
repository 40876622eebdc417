"""`GET /api/metrics` (fleet-wide billing metrics, JSON, cron secret or platform admin) and
`GET /metrics` (this process, Prometheus text, unauthenticated), SPEC §11; plus the latency middleware."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from aiohttp import web

from services.gateway.context import CONTEXT, request_id
from services.gateway.responses import error_response, json_response
from shared import prom
from shared.auth import AuthError, AuthMisconfigured, bearer_token, cron_secret_matches, verify_token
from shared.logging import get_logger
from shared.metrics_report import build_billing_metrics
from shared.queries import query

log = get_logger("metrics_api")

PROBE = web.AppKey("queue_depth_probe", prom.QueueDepthProbe)
PROCESS_KIND = "gateway"
ADMIN_LOOKUP_TIMEOUT_S = 3.0

_DB_ERRORS = (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def request_latency(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Latency histogram by route template, method and status (outermost, so it sees the final status)."""
    started = time.perf_counter()
    response = await handler(request)
    elapsed_s = time.perf_counter() - started
    prom.observe_request(PROCESS_KIND, prom.route_label(request), request.method, response.status, elapsed_s)
    return response


class _Denied(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


async def _authorize(request: web.Request) -> str:
    """Who is asking: `cron` for the cron secret, else the platform admin's user id; raises _Denied."""
    ctx = request.app[CONTEXT]
    settings = ctx.settings
    token = bearer_token(request.headers.get("Authorization"))
    unauthorized = error_response(401, "unauthorized", headers={"WWW-Authenticate": "Bearer"})
    cron_configured = True
    try:
        if cron_secret_matches(settings, token):
            return "cron"
    except AuthMisconfigured:
        cron_configured = False
    if token is None:
        raise _Denied(unauthorized)
    try:
        principal = verify_token(settings, token)
    except AuthMisconfigured as exc:
        if not cron_configured:
            log.error("metrics_auth_misconfigured", request_id=request_id(request))
            raise _Denied(error_response(503, "auth_misconfigured")) from exc
        raise _Denied(unauthorized) from exc
    except AuthError as exc:
        raise _Denied(unauthorized) from exc
    try:
        is_admin = await ctx.pool.fetchval(
            query("metrics_is_platform_admin"), principal.user_id, timeout=ADMIN_LOOKUP_TIMEOUT_S
        )
    except _DB_ERRORS as exc:
        raise _Denied(error_response(503, "database_unavailable")) from exc
    if not is_admin:
        raise _Denied(error_response(403, "forbidden"))
    return principal.user_id


async def api_metrics(request: web.Request) -> web.Response:
    try:
        caller = await _authorize(request)
    except _Denied as denied:
        return denied.response
    ctx = request.app[CONTEXT]
    try:
        report = await build_billing_metrics(ctx.counters, ctx.pool)
    except _DB_ERRORS as exc:
        error = str(exc) or type(exc).__name__
        log.warning("metrics_report_failed", request_id=request_id(request), error=error)
        return error_response(503, "database_unavailable")
    log.info("billing_metrics_read", request_id=request_id(request), caller=caller)
    return json_response(200, report)


async def prometheus_metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return prom.metrics_response(await prom.render_metrics(ctx.pool, request.app[PROBE]))


async def _probe(app: web.Application) -> AsyncIterator[None]:
    publisher = app[CONTEXT].publisher
    app[PROBE] = probe = prom.QueueDepthProbe(lambda: publisher.connection)
    yield
    await probe.close()


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_probe)
    app.router.add_get("/api/metrics", api_metrics)
    app.router.add_get("/metrics", prometheus_metrics)
