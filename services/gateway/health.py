"""`/healthz` (alive) and `/readyz` (ready while Postgres answers; SPEC §11)."""

from __future__ import annotations

import asyncio

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from services.gateway.context import CONTEXT
from services.gateway.responses import json_response


async def postgres_reachable(pool: asyncpg.Pool, timeout_s: float = 2.0) -> bool:
    try:
        await asyncio.wait_for(pool.fetchval("SELECT 1"), timeout=timeout_s)
    except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False
    return True


async def redis_reachable(redis: aioredis.Redis) -> bool:
    try:
        return bool(await redis.ping())
    except (TimeoutError, aioredis.RedisError, OSError):
        return False


async def healthz(request: web.Request) -> web.Response:
    return json_response(200, {"ok": True, "status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    checks = {
        "postgres": await postgres_reachable(ctx.pool),
        "redis": await redis_reachable(ctx.redis),
        "rabbitmq": ctx.publisher.is_ready,
    }
    ready = checks["postgres"]
    return json_response(
        200 if ready else 503, {"ok": ready, "status": "ready" if ready else "not_ready", "checks": checks}
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
