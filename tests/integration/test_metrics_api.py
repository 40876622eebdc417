"""`GET /api/metrics` (SPEC §11) and the fleet-wide counters behind it, against real Postgres and Redis."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from shared.auth import issue_token
from shared.billing_counters import COUNTER_NAMES, COUNTERS_KEY, BillingCounters, _Batch
from shared.metrics_report import DRIFT_SITES_KEY
from shared.redis_client import create_redis
from shared.settings import Settings
from shared.sites import create_site
from tests.conftest import CRON_SECRET, RedisServer, free_port, pg_dsn
from tests.support.gateway import gateway_client

Client = TestClient[Any, Any]


async def get_metrics(client: Client, token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    response = await client.get("/api/metrics", headers=headers)
    return response.status, await response.json()


async def test_auth_cron_secret_or_platform_admin(settings: Settings, db: asyncpg.Connection) -> None:
    await db.execute("INSERT INTO platform_admins (user_id) VALUES ('root-admin')")
    async with gateway_client(settings) as client:
        status, body = await get_metrics(client, None)
        assert (status, body["error"]) == (401, "unauthorized")
        assert (await get_metrics(client, "not-the-secret"))[0] == 401
        assert (await get_metrics(client, CRON_SECRET + "x"))[0] == 401
        expired = issue_token(settings, "root-admin", ttl_seconds=-60)
        assert (await get_metrics(client, expired))[0] == 401
        other_secret = settings.with_overrides(auth_jwt_secret="another-secret-" + "x" * 40)
        forged = issue_token(other_secret, "root-admin")
        assert (await get_metrics(client, forged))[0] == 401

        status, body = await get_metrics(client, issue_token(settings, "someone"))
        assert (status, body["error"]) == (403, "forbidden")
        headers = {"Authorization": f"Bearer {issue_token(settings, 'x')}"}
        response = await client.get("/api/metrics", headers=headers)
        assert response.headers["x-opsmantik-error-code"] == "forbidden"

        assert (await get_metrics(client, CRON_SECRET))[0] == 200
        assert (await get_metrics(client, issue_token(settings, "root-admin")))[0] == 200


async def test_without_any_secret_configured_the_endpoint_is_503(settings: Settings) -> None:
    async with gateway_client(settings.with_overrides(cron_secret=None, auth_jwt_secret=None)) as client:
        status, body = await get_metrics(client, "anything")
        assert (status, body["error"]) == (503, "auth_misconfigured")
    # A JWT secret alone still lets a platform admin in; a bad token is then 401, not 503.
    async with gateway_client(settings.with_overrides(cron_secret=None)) as client:
        assert (await get_metrics(client, "anything"))[0] == 401


async def _job(
    db: asyncpg.Connection, site: str, month: str, status: str, drift: str | None, age: timedelta
) -> None:
    site_id = await db.fetchval("SELECT id FROM sites WHERE public_id = $1", site)
    await db.execute(
        """INSERT INTO billing_reconciliation_jobs (site_id, year_month, status, last_drift_pct, updated_at)
           VALUES ($1, $2, $3, $4::numeric, now() - $5::interval)""",
        site_id, month, status, drift, age,
    )


async def test_body_is_flat_integers_with_drift_from_postgres(
    settings: Settings, db: asyncpg.Connection
) -> None:
    for name in ("drift-a", "drift-b", "calm", "failed", "old"):
        await create_site(db, public_id=name)
    minute, hours = timedelta(minutes=1), timedelta(hours=2)
    # Counted: drift-a (two months, counted once) and drift-b. Not counted: drift at exactly 1 %, a
    # FAILED job, a job last updated two hours ago.
    await _job(db, "drift-a", "2026-10", "COMPLETED", "0.05", minute)
    await _job(db, "drift-a", "2026-11", "COMPLETED", "0.5", minute)
    await _job(db, "drift-b", "2026-11", "COMPLETED", "0.0101", minute)
    await _job(db, "calm", "2026-11", "COMPLETED", "0.01", minute)
    await _job(db, "failed", "2026-11", "FAILED", "0.9", minute)
    await _job(db, "old", "2026-11", "COMPLETED", "0.9", hours)
    redis = aioredis.Redis.from_url(settings.redis_url)
    stored = {"billing_ingest_allowed_total": 41, "billing_ingest_duplicate_total": 3}
    await redis.hset(COUNTERS_KEY, mapping=stored)
    await redis.aclose()

    before = datetime.now(UTC)
    async with gateway_client(settings) as client:
        status, body = await get_metrics(client, CRON_SECRET)
    assert status == 200
    assert set(body) == {*COUNTER_NAMES, DRIFT_SITES_KEY, "generated_at"}
    assert all(type(body[name]) is int for name in (*COUNTER_NAMES, DRIFT_SITES_KEY))
    assert body["billing_ingest_allowed_total"] == 41
    assert body["billing_ingest_duplicate_total"] == 3
    assert body["billing_ingest_degraded_total"] == 0
    assert body[DRIFT_SITES_KEY] == 2
    assert body["generated_at"].endswith("Z")
    generated = datetime.fromisoformat(body["generated_at"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= generated <= datetime.now(UTC)


async def test_postgres_down_is_503_not_500(settings: Settings) -> None:
    dead = settings.with_overrides(database_url=pg_dsn("revkernel", port=free_port()))
    async with gateway_client(dead) as client:
        status, body = await get_metrics(client, CRON_SECRET)
        assert (status, body["error"]) == (503, "database_unavailable")
        # A JWT needs the platform_admins lookup: also 503 rather than a guess.
        status, body = await get_metrics(client, issue_token(settings, "root-admin"))
        assert (status, body["error"]) == (503, "database_unavailable")


# ------------------------------------------------------------------------------ BillingCounters


async def wait_for_totals(counters: BillingCounters, expected: dict[str, int], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        fleet = await counters.fleet_totals()
        if all(fleet[k] == v for k, v in expected.items()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"fleet totals {fleet} never reached {expected}")
        await asyncio.sleep(0.05)


async def test_two_processes_flush_into_one_fleet_total(redis_url: str) -> None:
    a, b = create_redis(redis_url), create_redis(redis_url)
    one, two = BillingCounters(a), BillingCounters(b)
    tasks = [asyncio.create_task(one.run(0.05)), asyncio.create_task(two.run(0.05))]
    try:
        for _ in range(5):
            one.add("billing_ingest_allowed_total")
        two.add("billing_ingest_allowed_total", 3)
        two.add("billing_reconciliation_runs_ok_total")
        expected = {"billing_ingest_allowed_total": 8, "billing_reconciliation_runs_ok_total": 1}
        await wait_for_totals(one, expected)
        # The fleet hash can show a batch a moment before its flusher has taken the reply and
        # cleared it from `pending`: wait for both, with a deadline.
        deadline = time.monotonic() + 10
        while one.pending or two.pending:
            assert time.monotonic() < deadline, (one.pending, two.pending)
            await asyncio.sleep(0.02)
        assert (await one.totals())["billing_ingest_allowed_total"] == 8
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await a.aclose()
        await b.aclose()


async def test_a_batch_retried_after_a_lost_reply_counts_once(redis_url: str) -> None:
    """The ambiguous failure (Redis applied the flush, the reply was lost): the retry carries the same
    batch id and contents, and the script adds nothing the second time."""
    redis = create_redis(redis_url)
    counters = BillingCounters(redis)
    batch = _Batch("batch-1", {"billing_ingest_allowed_total": 4, "billing_ingest_degraded_total": 1})
    await counters._apply(batch)
    await counters._apply(batch)
    await counters._apply(_Batch("batch-2", {"billing_ingest_allowed_total": 1}))
    fleet = await counters.fleet_totals()
    assert fleet["billing_ingest_allowed_total"] == 5 and fleet["billing_ingest_degraded_total"] == 1
    assert 0 < await redis.ttl(f"{COUNTERS_KEY}:flush:batch-1") <= 3600
    await redis.aclose()


async def test_redis_down_keeps_counts_in_process_until_it_returns() -> None:
    server = RedisServer().start()
    redis = create_redis(server.url(0))
    counters = BillingCounters(redis)
    restarted: RedisServer | None = None
    try:
        counters.add("billing_ingest_allowed_total", 2)
        assert await counters.flush() is True
        server.stop()
        counters.add("billing_ingest_allowed_total", 3)
        counters.add("billing_ingest_rejected_quota_total")
        assert await counters.flush() is False
        counters.add("billing_ingest_allowed_total")
        assert await counters.flush() is False
        # Redis down: the process's own unflushed share is what it can report.
        totals = await counters.totals()
        assert totals["billing_ingest_allowed_total"] == 4
        assert totals["billing_ingest_rejected_quota_total"] == 1
        held = {"billing_ingest_allowed_total": 4, "billing_ingest_rejected_quota_total": 1}
        assert counters.pending == held

        # Back, but empty (no persistence: the outage lost the hash): the held increments arrive whole.
        restarted = RedisServer(port=server.port).start()
        assert await counters.flush() is True
        assert counters.pending == {}
        fleet = await counters.fleet_totals()
        assert {k: fleet[k] for k in held} == held
    finally:
        await redis.aclose()
        server.stop()
        if restarted is not None:
            restarted.stop()


def test_unknown_or_negative_counter_is_refused() -> None:
    counters = BillingCounters(aioredis.Redis())
    with pytest.raises(ValueError, match="unknown billing counter"):
        counters.add("billing_ingest_typo_total")
    with pytest.raises(ValueError, match="only go up"):
        counters.add("billing_ingest_allowed_total", -1)
