"""A gateway killed in the middle of a capture group (SIGKILL after its Redis reservation, before its
COMMIT) leaves that reservation in the month's counter: Postgres rolls the rows back, nobody gives the
reservation back. SPEC §1.7 still holds: the plan takes exactly N events (and with soft limits, the
(N+1)-th is the first overage), because the gate checks the counter against Postgres at the limit."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from shared.months import current_year_month
from shared.quota import usage_key
from shared.settings import Settings
from tests.conftest import AMQP_HOST, AMQP_PORT, settings_env
from tests.integration.conftest import MakeSite
from tests.integration.reconciler_support import poll
from tests.support.gateway import drain_queue
from tests.support.gateway_process import GatewayProcess
from tests.support.proxy import TcpProxy

LIMIT = 3


async def post(http: aiohttp.ClientSession, base: str, n: int) -> tuple[int, dict[str, Any]]:
    body = orjson.dumps({"s": "site-a", "url": f"https://example.com/crash/{n}"})
    async with http.post(f"{base}/api/sync", data=body) as response:
        return response.status, await response.json()


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
async def test_a_reservation_left_by_a_killed_gateway_does_not_shrink_the_plan(
    settings: Settings,
    db: asyncpg.Connection,
    make_site: MakeSite,
    redis_client: aioredis.Redis,
    amqp_url: str,
    tmp_path: Path,
    soft: bool,
) -> None:
    site = await make_site(monthly_limit=LIMIT, soft=soft, multiplier="2" if soft else None)
    key = usage_key(site.id, current_year_month())
    # The survivor seeds the month's counter first (its key is missing): a seed of a missing key must
    # not count as the limit check, or the leak that follows would be trusted at the limit.
    survivor = await GatewayProcess(settings_env(settings), tmp_path / "survivor.log").start()
    broker = await TcpProxy(AMQP_HOST, AMQP_PORT).start()
    vhost = amqp_url.rsplit("/", 1)[1]
    held = settings.with_overrides(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{broker.port}/{vhost}", publish_timeout_ms=60_000
    )
    try:
        async with aiohttp.ClientSession() as http:
            assert (await post(http, survivor.url, 0))[0] == 200  # k = 1, the counter seeded
            doomed = await GatewayProcess(settings_env(held), tmp_path / "doomed.log").start()
            try:
                assert (await post(http, doomed.url, 1))[0] == 200  # k = 2, committed
                broker.swallow()  # the next group publishes and waits for a confirm that does not come
                in_flight = asyncio.create_task(post(http, doomed.url, 2))

                async def reserved() -> bool:
                    return await redis_client.get(key) == "3"

                await poll(reserved)
                doomed.kill()  # SIGKILL between the reservation and the COMMIT
                with pytest.raises(aiohttp.ClientError):
                    await in_flight
            finally:
                doomed.kill()
            assert await db.fetchval("SELECT count(*) FROM ingest_idempotency") == 2
            assert await redis_client.get(key) == "3"  # the dead process's reservation stays
            answers = [await post(http, survivor.url, n) for n in range(3, 3 + 2 * LIMIT - 1)]
    finally:
        await survivor.stop()
        await broker.close()

    cap = 2 * LIMIT if soft else LIMIT
    statuses = [status for status, _ in answers]
    assert statuses == [200] * (cap - 2) + [429] * (len(answers) - (cap - 2))
    counts = await db.fetchrow(
        """SELECT count(*) FILTER (WHERE billable) AS billable,
                  count(*) FILTER (WHERE billing_state = 'OVERAGE') AS overage
           FROM ingest_idempotency"""
    )
    assert counts["billable"] == cap
    assert counts["overage"] == (LIMIT if soft else 0)
    assert await redis_client.get(key) == str(cap)
    # The missing key's seed, then one check at the limit, then trusted (LIMIT_CHECK_TTL_S): a site
    # past its plan does not cost a seed per request.
    log_lines = (tmp_path / "survivor.log").read_text().splitlines()
    assert sum('"quota_counter_seeded"' in line for line in log_lines) == 2
    await drain_queue(amqp_url)
