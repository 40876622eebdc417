"""redis.asyncio client factory with short timeouts: Redis is a cache, never a reason to hang a request."""

from __future__ import annotations

import redis.asyncio as aioredis


def create_redis(url: str, *, timeout_s: float = 0.5, max_connections: int = 64) -> aioredis.Redis:
    """A client that fails fast (connect and socket timeouts) so callers can fall back."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        max_connections=max_connections,
        health_check_interval=0,
        retry_on_timeout=False,
    )
