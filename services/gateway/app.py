"""The gateway's aiohttp application: middleware, shared clients, and the routes of every module."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from services.gateway import cron_freeze, cron_reconcile, export, health, metrics_api, sync, watchtower
from services.gateway.bodies import ClientGone
from services.gateway.context import CONTEXT, REQUEST_ID, REQUEST_SITE, SETTINGS, GatewayContext
from services.gateway.responses import error_response
from shared.auth import MIN_JWT_SECRET_BYTES, jwt_secret_usable
from shared.billing_counters import BillingCounters
from shared.buildinfo import resolve_build_info
from shared.db import close_pool, create_pool
from shared.events import MAX_BODY_BYTES
from shared.ids import new_request_id
from shared.logging import get_logger, log_request
from shared.publisher import EventPublisher
from shared.redis_client import create_redis
from shared.settings import Settings

log = get_logger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Each module contributes its routes (and its own resources) through `setup(app)`.
ROUTE_MODULES = [health, sync, export, metrics_api, cron_reconcile, cron_freeze, watchtower]

_HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, build headers on every answer, JSON errors instead of HTML, one log line."""
    request[REQUEST_ID] = rid = new_request_id()
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        code = _HTTP_ERROR_CODES.get(exc.status, "http_error")
        # aiohttp's words: the reason ("Not Found"), or for a 413 its text ("Maximum request body size
        # 262144 exceeded.").
        detail = exc.text if exc.status == 413 and exc.text else exc.reason
        response = error_response(exc.status, code, detail=detail)
        if "Allow" in exc.headers:  # a 405 says which methods the path takes (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
    except asyncio.CancelledError:
        raise
    except ClientGone as gone:
        response = gone.response()
    except Exception:
        log.exception("unhandled_error", request_id=rid, path=request.path)
        response = error_response(500, "internal_error")
    build = request.app[CONTEXT].build
    response.headers["x-opsmantik-commit"] = build.commit_sha
    response.headers["x-opsmantik-branch"] = build.git_branch
    response.headers["x-request-id"] = rid
    if request.path != "/healthz":
        log_request(
            "gateway",
            request_id=rid,
            method=request.method,
            path=request.path,
            site=request.get(REQUEST_SITE),
            status=response.status,
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
        )
    return response


async def _clients(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if not jwt_secret_usable(settings):
        # SPEC §10: the gateway still starts, and says so once now (each export answers 503 too).
        log.error(
            "auth_misconfigured",
            detail=f"AUTH_JWT_SECRET is unset or shorter than {MIN_JWT_SECRET_BYTES} bytes: "
            "the dispute export answers 503 auth_misconfigured",
        )
    # min_size=0: the gateway starts (and answers 500 billing_gate_closed) while Postgres is down.
    pool = await create_pool(
        settings.database_url, min_size=0, max_size=16, timeout=2.0, role=settings.database_role
    )
    redis = create_redis(settings.redis_url)
    publisher = EventPublisher(settings.amqp_url, timeout_ms=settings.publish_timeout_ms)
    await publisher.start()
    counters = BillingCounters(redis)
    flusher = asyncio.create_task(counters.run(), name="billing-counters-flush")
    app[CONTEXT] = GatewayContext(
        settings=settings,
        build=resolve_build_info(settings),
        pool=pool,
        redis=redis,
        publisher=publisher,
        counters=counters,
    )
    yield
    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)
    await counters.close()
    await publisher.close()
    await redis.aclose()
    await close_pool(pool)


def build_app(settings: Settings) -> web.Application:
    """The whole gateway for `settings`; clients connect when the app starts."""
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[metrics_api.request_latency, request_context],
        # Bodies are inflated by /api/sync itself, with a bound (shared.content_coding): aiohttp would
        # inflate a whole gzip bomb first.
        handler_args={"auto_decompress": False},
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_clients)
    for module in ROUTE_MODULES:
        module.setup(app)
    return app
