"""Reconciliation against real Postgres and Redis (SPEC §8): counts, drift, the job table, leases."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from shared.billing_counters import BillingCounters
from shared.db import create_pool
from shared.months import add_months, current_year_month
from shared.reconciliation import (
    JobSettings,
    claim_jobs,
    enqueue_jobs,
    reconcile_month,
    run_jobs,
    usage_key,
)
from shared.redis_client import create_redis
from shared.settings import Settings
from tests.conftest import REPO_ROOT, RedisServer, free_port, settings_env
from tests.integration.reconciler_support import add_rows, create_site, ensure_month, job, poll

INSERT_USAGE = (
    "INSERT INTO site_usage_monthly (site_id, year_month, event_count, overage_count) VALUES ($1, $2, 0, 0)"
)
SELECT_USAGE = "SELECT event_count FROM site_usage_monthly WHERE site_id = $1 AND year_month = $2"
CURRENT = current_year_month()
PREVIOUS = add_months(CURRENT, -1)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, min_size=1, max_size=8)
    yield pool
    await pool.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = create_redis(redis_url, timeout_s=1.0)
    yield client
    await client.aclose()


async def test_counts_are_billable_and_overage_rows_only(
    db: asyncpg.Connection, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    older = add_months(CURRENT, -2)
    await ensure_month(db, PREVIOUS)
    await ensure_month(db, older)
    a, b = await create_site(db), await create_site(db)
    await add_rows(db, a, CURRENT, 7)
    await add_rows(db, a, CURRENT, 3, state="OVERAGE")
    await add_rows(db, a, CURRENT, 2, state="RECOVERED")
    await add_rows(db, a, CURRENT, 4, billable=False, reason="system")
    await add_rows(db, a, CURRENT, 5, billable=False, reason="rejected_quota")
    await add_rows(db, a, PREVIOUS, 6)
    await add_rows(db, a, PREVIOUS, 1, state="OVERAGE")
    await add_rows(db, b, CURRENT, 2)
    await add_rows(db, b, older, 9)
    await add_rows(db, b, older, 3, billable=False, reason="rejected_quota")

    expected = {
        (a, CURRENT): (12, 3),
        (a, PREVIOUS): (7, 1),
        (b, CURRENT): (2, 0),
        (b, older): (9, 0),
        (b, PREVIOUS): (0, 0),
    }
    for (site, month), (events, overage) in expected.items():
        result = await reconcile_month(pool, redis, site, month)
        assert (result.event_count, result.overage_count) == (events, overage)
        assert result.redis_status == "missing" and result.redis_value is None and not result.corrected
        stored = await db.fetchrow(
            "SELECT event_count, overage_count FROM site_usage_monthly "
            "WHERE site_id = $1 AND year_month = $2",
            site,
            month,
        )
        assert stored is not None and (stored["event_count"], stored["overage_count"]) == (events, overage)
    # Reconciliation never seeds a missing counter: that is the gateway's job.
    assert await redis.exists(usage_key(a, CURRENT)) == 0


async def test_enqueue_and_run_through_the_job_table(
    db: asyncpg.Connection, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    await ensure_month(db, PREVIOUS)
    active, idle = await create_site(db), await create_site(db)
    await add_rows(db, active, CURRENT, 4)
    await add_rows(db, idle, add_months(CURRENT, -6), 1)  # old rows only: not an active site
    counters = BillingCounters(redis)

    enqueued = await enqueue_jobs(pool)
    assert (enqueued.enqueued, enqueued.sites) == (2, 1)
    result = await run_jobs(pool, redis, counters=counters)
    assert (result.processed, result.completed, result.failed) == (2, 2, 0)
    for month, count in ((CURRENT, 4), (PREVIOUS, 0)):
        row = await job(db, active, month)
        assert row is not None and row["status"] == "COMPLETED" and row["last_error"] is None
        usage = await db.fetchval(SELECT_USAGE, active, month)
        assert usage == count
    assert await job(db, idle, CURRENT) is None
    assert (await counters.totals())["billing_reconciliation_runs_ok_total"] == 2
    assert (await run_jobs(pool, redis)).processed == 0


async def test_current_month_keeps_being_refreshed(
    db: asyncpg.Connection, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    site = await create_site(db)
    await add_rows(db, site, CURRENT, 10)
    await enqueue_jobs(pool)
    await run_jobs(pool, redis)
    await add_rows(db, site, CURRENT, 15)
    again = await enqueue_jobs(pool)
    assert again.enqueued == 2  # both COMPLETED jobs of the open months were re-queued
    assert (await run_jobs(pool, redis)).completed == 2
    usage = await db.fetchval(SELECT_USAGE, site, CURRENT)
    assert usage == 25


async def test_drift_above_threshold_is_corrected_and_recorded(
    db: asyncpg.Connection, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    site = await create_site(db)
    await add_rows(db, site, CURRENT, 200)
    key = usage_key(site, CURRENT)
    await redis.set(key, 300)
    await db.execute(
        "INSERT INTO quota_usage_stripes (site_id, year_month, stripe, used) "
        "VALUES ($1, $2, 0, 150), ($1, $2, 77, 9)",
        site,
        CURRENT,
    )
    await enqueue_jobs(pool)
    assert (await run_jobs(pool, redis)).completed == 2
    assert int(await redis.get(key)) == 200
    row = await job(db, site, CURRENT)
    assert row is not None and row["last_drift_pct"] == Decimal("0.5")
    stripes = await db.fetch(
        "SELECT stripe, used FROM quota_usage_stripes WHERE site_id = $1 AND year_month = $2", site, CURRENT
    )
    assert [(r["stripe"], r["used"]) for r in stripes] == [(0, 200)]
    drift_sites = await db.fetchval(
        "SELECT count(DISTINCT site_id) FROM billing_reconciliation_jobs WHERE status = 'COMPLETED' "
        "AND last_drift_pct > 0.01 AND updated_at > now() - interval '1 hour'"
    )
    assert drift_sites == 1


async def test_drift_within_threshold_is_left_alone(
    db: asyncpg.Connection, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    site = await create_site(db)
    await add_rows(db, site, CURRENT, 500)
    key = usage_key(site, CURRENT)
    await redis.set(key, 508)  # threshold max(10, 5) = 10
    await db.execute(
        "INSERT INTO quota_usage_stripes (site_id, year_month, stripe, used) VALUES ($1, $2, 0, 499)",
        site,
        CURRENT,
    )
    result = await reconcile_month(pool, redis, site, CURRENT)
    assert not result.corrected and result.drift_abs == 8 and result.drift_pct == pytest.approx(8 / 500)
    assert int(await redis.get(key)) == 508
    assert await db.fetchval("SELECT used FROM quota_usage_stripes WHERE site_id = $1", site) == 499
    # 11 above: corrected.
    await redis.set(key, 511)
    result = await reconcile_month(pool, redis, site, CURRENT)
    assert result.corrected and int(await redis.get(key)) == 500


async def test_correction_waits_for_uncommitted_ingest_and_loses_no_reservation(
    db: asyncpg.Connection, database_url: str, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    """The gateway reserves in Redis inside its uncommitted transaction, holding the lock SHARED."""
    site = await create_site(db)
    await add_rows(db, site, CURRENT, 100)
    key = usage_key(site, CURRENT)
    await redis.set(key, 150)  # 50 too high: will be corrected
    ingest = await asyncpg.connect(database_url)
    try:
        tx = ingest.transaction()
        await tx.start()
        await ingest.execute("SELECT pg_advisory_xact_lock_shared(quota_lock_key($1, $2))", site, CURRENT)
        await add_rows(ingest, site, CURRENT, 3)
        await redis.incrby(key, 3)  # the reservation of the three uncommitted rows
        reconcile = asyncio.create_task(reconcile_month(pool, redis, site, CURRENT, lock_timeout_ms=30_000))
        await poll(
            lambda: db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        )
        await tx.commit()
    finally:
        await ingest.close()
    result = await reconcile
    assert result.corrected and result.event_count == 103
    assert int(await redis.get(key)) == 103  # without the lock it would be 100: three reservations lost


async def test_redis_down_still_completes_the_job(db: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    server = RedisServer().start()
    client = create_redis(server.url(), timeout_s=0.3)
    try:
        site = await create_site(db)
        await add_rows(db, site, CURRENT, 12)
        await client.set(usage_key(site, CURRENT), 500)
        server.stop()
        await enqueue_jobs(pool)
        result = await run_jobs(pool, client)
        assert (result.completed, result.failed) == (2, 0)
        row = await job(db, site, CURRENT)
        assert row is not None and row["status"] == "COMPLETED" and row["last_drift_pct"] is None
        assert await db.fetchval(SELECT_USAGE, site, CURRENT) == 12
    finally:
        await client.aclose()
        server.stop()


async def test_failure_is_recorded_with_backoff_and_rearmed_after_attempts(
    db: asyncpg.Connection, database_url: str, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    site = await create_site(db)
    await add_rows(db, site, CURRENT, 20)
    await redis.set(usage_key(site, CURRENT), 90)
    counters = BillingCounters(redis)
    holder = await asyncpg.connect(database_url)
    settings = JobSettings(lock_timeout_ms=50, retry_base_s=600)
    try:
        await holder.execute("SELECT pg_advisory_lock(quota_lock_key($1, $2))", site, CURRENT)
        await enqueue_jobs(pool)
        result = await run_jobs(pool, redis, settings=settings, counters=counters)
        assert (result.completed, result.failed) == (1, 1)
    finally:
        await holder.close()
    row = await job(db, site, CURRENT)
    assert row is not None and row["status"] == "FAILED" and row["attempt_count"] == 1
    assert "lock" in row["last_error"].lower()
    assert (await counters.totals())["billing_reconciliation_runs_failed_total"] == 1
    # Backoff not elapsed: not claimed again.
    assert (await run_jobs(pool, redis, settings=settings)).processed == 0
    # Attempts used up: enqueue re-arms it with attempt_count = 0.
    await db.execute("UPDATE billing_reconciliation_jobs SET attempt_count = 5 WHERE site_id = $1", site)
    assert (await enqueue_jobs(pool)).enqueued == 2
    row = await job(db, site, CURRENT)
    assert row is not None and row["status"] == "QUEUED" and row["attempt_count"] == 0
    assert (await run_jobs(pool, redis)).completed == 2
    assert int(await redis.get(usage_key(site, CURRENT))) == 20


async def test_a_failed_job_is_retried_after_its_backoff_until_attempts_run_out(
    db: asyncpg.Connection, database_url: str, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    """SPEC §8: FAILED jobs are claimed again once `next_attempt_at` passed, at most 5 attempts, and
    each failure logs BILLING_RECONCILE_FAILED with its attempt count."""
    from structlog.testing import capture_logs

    site = await create_site(db)
    await add_rows(db, site, CURRENT, 3)
    await redis.set(usage_key(site, CURRENT), 90)  # drift: the correction needs the month's lock
    await enqueue_jobs(pool)
    await db.execute("DELETE FROM billing_reconciliation_jobs WHERE year_month <> $1", CURRENT)
    holder = await asyncpg.connect(database_url)
    settings = JobSettings(lock_timeout_ms=50, retry_base_s=600)
    attempts = []
    try:
        await holder.execute("SELECT pg_advisory_lock(quota_lock_key($1, $2))", site, CURRENT)
        with capture_logs() as logs:
            for _ in range(6):
                result = await run_jobs(pool, redis, settings=settings)
                row = await job(db, site, CURRENT)
                assert row is not None
                attempts.append((result.processed, row["status"], row["attempt_count"]))
                # time passes
                await db.execute("UPDATE billing_reconciliation_jobs SET next_attempt_at = now()")
    finally:
        await holder.close()
    assert attempts == [(1, "FAILED", n) for n in range(1, 6)] + [(0, "FAILED", 5)]
    failures = [e for e in logs if e["event"] == "BILLING_RECONCILE_FAILED"]
    assert [e["attempt_count"] for e in failures] == [1, 2, 3, 4, 5]
    # The lock gone and the backoff passed, a re-armed job completes (enqueue re-arms used-up jobs).
    assert (await enqueue_jobs(pool)).enqueued == 2  # re-armed, and the previous month's job again
    assert (await run_jobs(pool, redis)).completed == 2
    assert int(await redis.get(usage_key(site, CURRENT))) == 3


async def test_a_run_claims_at_most_its_limit(
    db: asyncpg.Connection, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    """SPEC §8 `run(limit = 50)`: one run claims at most 50 jobs; the rest wait for the next run."""
    for _ in range(30):
        site = await create_site(db)
        await add_rows(db, site, CURRENT, 1)
    assert (await enqueue_jobs(pool)).enqueued == 60  # current and previous month per active site
    first = await run_jobs(pool, redis)
    second = await run_jobs(pool, redis)
    assert (first.processed, second.processed) == (50, 10)
    completed = "SELECT count(*) FROM billing_reconciliation_jobs WHERE status = 'COMPLETED'"
    assert await db.fetchval(completed) == 60


async def test_two_reconcilers_never_claim_the_same_job(
    db: asyncpg.Connection, database_url: str, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    sites = [await create_site(db) for _ in range(30)]
    for site in sites:
        await add_rows(db, site, CURRENT, 2)
    assert (await enqueue_jobs(pool)).enqueued == 60
    other = await create_pool(database_url, min_size=1, max_size=4)
    try:
        claimed: list[list[int]] = [[], []]

        async def claimer(index: int, p: asyncpg.Pool) -> None:
            while jobs := await claim_jobs(p, limit=3, token=f"w{index}", settings=JobSettings()):
                claimed[index].extend(j.id for j in jobs)
                await asyncio.sleep(0)

        await asyncio.gather(claimer(0, pool), claimer(1, other))
        assert not set(claimed[0]) & set(claimed[1])
        assert len(claimed[0]) + len(claimed[1]) == 60 == len(set(claimed[0]) | set(claimed[1]))
        assert claimed[0] and claimed[1]

        # And whole runs side by side: every job processed once.
        await db.execute("UPDATE billing_reconciliation_jobs SET status = 'QUEUED', locked_by = NULL")
        one, two = await asyncio.gather(
            run_jobs(pool, redis, limit=60, worker_id="a"), run_jobs(other, redis, limit=60, worker_id="b")
        )
        assert one.processed + two.processed == 60 and one.failed == two.failed == 0
    finally:
        await other.close()
    assert (
        await db.fetchval("SELECT count(*) FROM billing_reconciliation_jobs WHERE status = 'COMPLETED'") == 60
    )


async def test_killed_reconciler_leaves_processing_job_that_another_reclaims_after_lease(
    db: asyncpg.Connection, database_url: str, pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings
) -> None:
    site = await create_site(db)
    await add_rows(db, site, CURRENT, 5)
    # Hold the usage row so the subprocess's job blocks mid-way (after its claim, before completion).
    await db.execute(INSERT_USAGE, site, CURRENT)
    blocker = await asyncpg.connect(database_url)
    blocker_tx = blocker.transaction()
    await blocker_tx.start()
    await blocker.execute(
        "SELECT 1 FROM site_usage_monthly WHERE site_id = $1 AND year_month = $2 FOR UPDATE", site, CURRENT
    )
    env = settings_env(settings)
    env["RECONCILER_HTTP_PORT"] = str(free_port())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "reconciler",
            "--lease-seconds",
            "1",
            "--recovery-interval",
            "3600",
        ],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def processing() -> bool:
            row = await job(db, site, CURRENT)
            return row is not None and row["status"] == "PROCESSING"

        await poll(processing)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        await blocker_tx.rollback()
        await blocker.close()
    row = await job(db, site, CURRENT)
    assert row is not None and row["status"] == "PROCESSING"  # the dead worker never finished it

    async def reclaimed() -> bool:
        await run_jobs(pool, redis, worker_id="survivor", settings=JobSettings(lease_s=1))
        row = await job(db, site, CURRENT)
        return row is not None and row["status"] == "COMPLETED"

    await poll(reclaimed, interval_s=0.3)
    assert await db.fetchval(SELECT_USAGE, site, CURRENT) == 5


async def test_shutdown_hands_claimed_jobs_back(
    db: asyncpg.Connection, database_url: str, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    site = await create_site(db)
    await add_rows(db, site, CURRENT, 1)
    await db.execute(INSERT_USAGE, site, CURRENT)
    await enqueue_jobs(pool)
    blocker = await asyncpg.connect(database_url)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("SELECT 1 FROM site_usage_monthly WHERE site_id = $1 FOR UPDATE", site)
    try:
        run = asyncio.create_task(run_jobs(pool, redis, settings=JobSettings(concurrency=1)))

        async def claimed() -> bool:
            row = await job(db, site, CURRENT)
            return row is not None and row["status"] == "PROCESSING"

        await poll(claimed)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    finally:
        await tx.rollback()
        await blocker.close()
    statuses = await db.fetch("SELECT status FROM billing_reconciliation_jobs WHERE site_id = $1", site)
    assert sorted(r["status"] for r in statuses) == ["QUEUED", "QUEUED"]


def revkernel_json(settings: Settings, *args: str) -> Any:
    """Run `revkernel ARGS` and return what it printed (JSON)."""
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=settings_env(settings),
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return orjson.loads(out.stdout)


async def test_reconcile_cli_prints_counts(db: asyncpg.Connection, settings: Settings) -> None:
    public_id = f"cli-{uuid.uuid4().hex[:6]}"
    site = await create_site(db, public_id=public_id)
    await add_rows(db, site, CURRENT, 3)
    body = revkernel_json(settings, "reconcile", "--site", public_id, "--month", CURRENT)
    assert body["ok"] is True and body["sites"] == 1
    assert body["results"][0]["event_count"] == 3
    usage = await db.fetchrow(
        "SELECT event_count, overage_count FROM site_usage_monthly WHERE site_id = $1 AND year_month = $2",
        site,
        CURRENT,
    )
    assert (usage["event_count"], usage["overage_count"]) == (3, 0)


async def test_backfill_cli_enqueues_missing_jobs(db: asyncpg.Connection, settings: Settings) -> None:
    """SPEC §13 `revkernel backfill`: the endpoint's job, from the command line; a site by public id."""
    idle_public_id = f"idle-{uuid.uuid4().hex[:6]}"
    active, idle = await create_site(db), await create_site(db, public_id=idle_public_id)
    await ensure_month(db, PREVIOUS)
    await add_rows(db, active, PREVIOUS, 2)

    every_site = revkernel_json(settings, "backfill", "--from", PREVIOUS, "--to", CURRENT)
    again = revkernel_json(settings, "backfill", "--from", PREVIOUS, "--to", CURRENT)
    one_site = revkernel_json(
        settings, "backfill", "--from", PREVIOUS, "--to", PREVIOUS, "--site", idle_public_id
    )

    assert (every_site["ok"], every_site["enqueued"], every_site["months"], every_site["sites"]) == (
        True, 2, 2, 1
    )
    assert again["enqueued"] == 0
    assert (one_site["enqueued"], one_site["months"], one_site["sites"]) == (1, 1, 1)
    assert (await job(db, active, PREVIOUS))["status"] == "QUEUED"
    assert (await job(db, idle, PREVIOUS))["status"] == "QUEUED"
    assert await job(db, idle, CURRENT) is None


async def test_reconciler_process_is_ready_and_exits_0_on_sigterm(settings: Settings) -> None:
    port = free_port()
    env = {**settings_env(settings), "RECONCILER_HTTP_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "reconciler"],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await poll(ready, interval_s=0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
