"""The capture connections ask Postgres to write their dirty pages back early (backend_flush_after) and
to plan the capture function's statements once (plan_cache_mode), set per connection with set_config,
so it also holds behind PgBouncer."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from services.gateway.sync import CAPTURE_SESSION_SETTINGS, SYNC_GATE
from shared.db import close_pool, create_pool, keep_session_state


async def test_a_pool_sets_its_session_settings_on_every_connection(database_url: str) -> None:
    pool = await create_pool(
        database_url,
        min_size=2,
        max_size=2,
        reset=keep_session_state,
        session_settings={"backend_flush_after": "64kB"},
    )
    try:
        async with pool.acquire() as first, pool.acquire() as second:
            assert await first.fetchval("SHOW backend_flush_after") == "64kB"
            assert await second.fetchval("SHOW backend_flush_after") == "64kB"
        async with pool.acquire() as again:  # still set after a release
            assert await again.fetchval("SHOW backend_flush_after") == "64kB"
    finally:
        await close_pool(pool)
    with pytest.raises(ValueError, match="reset"):  # RESET ALL on release would undo them silently
        await create_pool(database_url, session_settings={"backend_flush_after": "64kB"})
    plain = await create_pool(database_url, min_size=1, max_size=1)
    try:
        assert await plain.fetchval("SHOW backend_flush_after") == "0"  # the server default, untouched
    finally:
        await close_pool(plain)


async def test_the_gateway_captures_on_connections_that_flush_early_and_plan_once(
    gateway: TestClient[Any, Any],
) -> None:
    pool = gateway.app[SYNC_GATE].pipeline._pool  # noqa: SLF001 - the wiring under test
    async with pool.acquire() as conn:
        flush_after = await conn.fetchval("SHOW backend_flush_after")
        plan_cache_mode = await conn.fetchval("SHOW plan_cache_mode")
    assert flush_after == "256kB"
    assert plan_cache_mode == "force_generic_plan"
    assert set(CAPTURE_SESSION_SETTINGS) == {"backend_flush_after", "plan_cache_mode"}
