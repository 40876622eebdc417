"""Monthly usage reconciliation (SPEC §8): count from the source of truth, correct the Redis cache,
and the job table that makes sure every open (site, month) keeps being reconciled.

`reconcile_month` is what the reconciler's jobs, `revkernel reconcile` and the freezer (before it
snapshots) call. The exactness protocol with the gateway is in docs/architecture.md "Quota" and
docs/reconciler.md: the Redis counter is only written under the EXCLUSIVE quota lock of the month,
by a delta, and only when the key exists.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog

from shared.billing_counters import BillingCounters
from shared.logging import get_logger
from shared.months import add_months, current_year_month, is_year_month, months_between
from shared.queries import query
from shared.quota import usage_key

log = get_logger("reconciliation")

LUA_DIR = Path(__file__).resolve().parent / "lua"
MAX_BACKFILL_MONTHS = 12
REDIS_ERRORS = (aioredis.RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class JobSettings:
    """Knobs of the job table; the defaults are SPEC §8's (lease 5 min, 5 attempts, run 50)."""

    lease_s: float = 300.0
    max_attempts: int = 5
    retry_base_s: float = 30.0
    retry_max_s: float = 3600.0
    run_limit: int = 50
    concurrency: int = 4
    lock_timeout_ms: int = 5000


# ----------------------------------------------------------------------------------------- pure


def drift_threshold(pg_count: int) -> float:
    """Drift above which Redis is corrected: max(10, 1 % of the Postgres count)."""
    return max(10.0, pg_count * 0.01)


def drift_pct(drift_abs: int, pg_count: int) -> float:
    """|redis − pg| / pg, and 0 when pg is 0 (SPEC §8)."""
    return 0.0 if pg_count == 0 else drift_abs / pg_count


def needs_correction(observed: int, pg_count: int) -> bool:
    return abs(observed - pg_count) > drift_threshold(pg_count)


def retry_delay_s(failed_attempts: int, settings: JobSettings) -> float:
    """Exponential backoff after the n-th failed attempt (n ≥ 1), capped."""
    return float(min(settings.retry_base_s * (2 ** max(0, failed_attempts - 1)), settings.retry_max_s))


def open_months(now: datetime | None = None) -> tuple[str, str]:
    """(current, previous) UTC months: the months enqueue keeps reconciling."""
    current = current_year_month(now)
    return current, add_months(current, -1)


# ----------------------------------------------------------------------------------------- backfill


class BackfillInvalid(ValueError):
    """A backfill request §8 says is a 400; `code` is the error code, `reason` says why."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BackfillRequest:
    months: tuple[str, ...]
    site_id: uuid.UUID | None


def parse_backfill_request(body: object) -> BackfillRequest:
    """Validate `{site_id?, from, to}` (pure): months well-formed, from ≤ to, ≤ 12 months, UUID site."""
    if not isinstance(body, Mapping):
        raise BackfillInvalid("invalid_json", "body must be a JSON object")
    first, last = body.get("from"), body.get("to")
    for name, value in (("from", first), ("to", last)):
        if not is_year_month(value):
            raise BackfillInvalid("invalid_month", f"`{name}` must be a YYYY-MM month")
    assert isinstance(first, str) and isinstance(last, str)
    if first > last:
        raise BackfillInvalid("invalid_range", "`from` is after `to`")
    months = months_between(first, last)
    if len(months) > MAX_BACKFILL_MONTHS:
        raise BackfillInvalid("range_too_large", f"at most {MAX_BACKFILL_MONTHS} months, got {len(months)}")
    raw_site = body.get("site_id")
    site_id: uuid.UUID | None = None
    if raw_site is not None:
        if not isinstance(raw_site, str):
            raise BackfillInvalid("invalid_site_id", "`site_id` must be a UUID string")
        try:
            site_id = uuid.UUID(raw_site)
        except ValueError:
            raise BackfillInvalid("invalid_site_id", "`site_id` must be a UUID") from None
    return BackfillRequest(months=tuple(months), site_id=site_id)


def parse_month_arg(value: object) -> str:
    """A `YYYY-MM` argument, or ValueError naming the problem."""
    if not is_year_month(value):
        raise ValueError(f"not a YYYY-MM month: {value!r}")
    assert isinstance(value, str)
    return value


# ----------------------------------------------------------------------------------------- reconcile


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    site_id: uuid.UUID
    year_month: str
    event_count: int
    overage_count: int
    redis_value: int | None  # the counter as observed before any correction; None: missing or unreadable
    drift_abs: int | None
    drift_pct: float | None
    corrected: bool
    redis_status: str  # "ok", "missing" (seeded by the gateway, not here) or "unavailable"

    def as_dict(self) -> dict[str, Any]:
        return {
            "site_id": str(self.site_id),
            "year_month": self.year_month,
            "event_count": self.event_count,
            "overage_count": self.overage_count,
            "redis_value": self.redis_value,
            "drift_abs": self.drift_abs,
            "drift_pct": self.drift_pct,
            "corrected": self.corrected,
            "redis_status": self.redis_status,
        }


@cache
def _correct_script_source() -> str:
    return (LUA_DIR / "reconcile_correct_usage.lua").read_text(encoding="utf-8")


async def _read_counter(redis: aioredis.Redis, key: str) -> tuple[int | None, str]:
    try:
        raw = await redis.get(key)
    except REDIS_ERRORS as exc:
        log.warning("reconcile_redis_unavailable", key=key, error=str(exc) or type(exc).__name__)
        return None, "unavailable"
    if raw is None:
        return None, "missing"
    try:
        return int(raw), "ok"
    except ValueError:
        log.error("reconcile_redis_not_integer", key=key, value=repr(raw))
        return None, "unavailable"


async def _apply_delta(redis: aioredis.Redis, key: str, delta: int) -> int | None:
    """INCRBY delta if the key exists; the new value, or None (missing key or Redis failure)."""
    try:
        result = await redis.eval(_correct_script_source(), 1, key, delta)
    except REDIS_ERRORS as exc:
        log.warning("reconcile_redis_correction_failed", key=key, error=str(exc) or type(exc).__name__)
        return None
    return None if result is None else int(result)


async def _count(
    conn: asyncpg.Connection | asyncpg.Pool, site_id: uuid.UUID, year_month: str
) -> tuple[int, int]:
    row = await conn.fetchrow(query("reconcile_count_month"), site_id, year_month)
    assert row is not None
    return int(row["event_count"]), int(row["overage_count"])


async def reconcile_month(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    site_id: uuid.UUID,
    year_month: str,
    *,
    lock_timeout_ms: int = 5000,
) -> ReconcileResult:
    """Count the month from `ingest_idempotency`, store it in `site_usage_monthly`, measure and (above
    the threshold) correct the Redis counter. Redis trouble never fails it; Postgres trouble does."""
    key = usage_key(site_id, year_month)
    event_count, overage_count = await _count(pool, site_id, year_month)
    observed, redis_status = await _read_counter(redis, key)
    corrected = False
    if observed is not None and needs_correction(observed, event_count):
        # Cheap check said "drifted": take the EXCLUSIVE lock, so no uncommitted ingest row holds a
        # reservation the COUNT cannot see, then count and read again before writing anything.
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(query("reconcile_set_lock_timeout"), f"{lock_timeout_ms}ms")
            await conn.execute(query("reconcile_lock_month"), site_id, year_month)
            event_count, overage_count = await _count(conn, site_id, year_month)
            observed, redis_status = await _read_counter(redis, key)
            if observed is not None and needs_correction(observed, event_count):
                new_value = await _apply_delta(redis, key, event_count - observed)
                if new_value is not None:
                    corrected = True
                    await conn.execute(query("reconcile_reset_stripes"), site_id, year_month)
                    log.info(
                        "reconcile_redis_corrected",
                        site_id=str(site_id),
                        year_month=year_month,
                        observed=observed,
                        pg=event_count,
                        new_value=new_value,
                    )
            await conn.execute(
                query("reconcile_upsert_usage"), site_id, year_month, event_count, overage_count
            )
    else:
        await pool.execute(query("reconcile_upsert_usage"), site_id, year_month, event_count, overage_count)
    drift_abs = None if observed is None else abs(observed - event_count)
    return ReconcileResult(
        site_id=site_id,
        year_month=year_month,
        event_count=event_count,
        overage_count=overage_count,
        redis_value=observed,
        drift_abs=drift_abs,
        drift_pct=None if drift_abs is None else drift_pct(drift_abs, event_count),
        corrected=corrected,
        redis_status=redis_status,
    )


# ----------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    enqueued: int
    sites: int


@dataclass(frozen=True, slots=True)
class RunResult:
    processed: int
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class BackfillResult:
    enqueued: int
    months: int
    sites: int


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: int
    site_id: uuid.UUID
    year_month: str
    attempt_count: int


async def enqueue_jobs(
    pool: asyncpg.Pool, *, now: datetime | None = None, settings: JobSettings = JobSettings()
) -> EnqueueResult:
    """Queue (current, previous) month for every site with rows this month or in the last 24 h."""
    now = now or datetime.now(UTC)
    current, previous = open_months(now)
    site_ids = [
        r["id"]
        for r in await pool.fetch(
            query("reconcile_active_sites"), current, previous, now - timedelta(hours=24)
        )
    ]
    if not site_ids:
        return EnqueueResult(enqueued=0, sites=0)
    sites, months = pairs(site_ids, (current, previous))
    rows = await pool.fetch(query("reconcile_enqueue_jobs"), sites, months, settings.max_attempts)
    return EnqueueResult(enqueued=len(rows), sites=len(site_ids))


async def backfill_jobs(pool: asyncpg.Pool, request: BackfillRequest) -> BackfillResult:
    """Insert the missing jobs of a validated backfill; BackfillInvalid for an unknown site."""
    if request.site_id is not None:
        if not await pool.fetchval(query("reconcile_site_exists"), request.site_id):
            raise BackfillInvalid("unknown_site", "no site with that site_id")
        site_ids = [request.site_id]
    else:
        site_ids = [
            r["id"]
            for r in await pool.fetch(query("reconcile_sites_with_rows_in_months"), list(request.months))
        ]
    sites, months = pairs(site_ids, request.months)
    rows = await pool.fetch(query("reconcile_insert_missing_jobs"), sites, months) if sites else []
    return BackfillResult(enqueued=len(rows), months=len(request.months), sites=len(site_ids))


async def claim_jobs(
    pool: asyncpg.Pool, *, limit: int, token: str, settings: JobSettings
) -> list[ClaimedJob]:
    rows = await pool.fetch(
        query("reconcile_claim_jobs"), limit, settings.lease_s, settings.max_attempts, token
    )
    return [ClaimedJob(r["id"], r["site_id"], r["year_month"], r["attempt_count"]) for r in rows]


async def _run_one(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    job: ClaimedJob,
    token: str,
    settings: JobSettings,
    counters: BillingCounters | None,
) -> bool:
    with structlog.contextvars.bound_contextvars(
        job_id=job.id, site_id=str(job.site_id), year_month=job.year_month
    ):
        try:
            result = await reconcile_month(
                pool, redis, job.site_id, job.year_month, lock_timeout_ms=settings.lock_timeout_ms
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A job's failure is data (recorded, retried with backoff), never a reason to stop the worker.
            error = f"{type(exc).__name__}: {exc}"[:1000]
            attempts = await asyncio.shield(
                pool.fetchval(
                    query("reconcile_fail_job"),
                    job.id,
                    token,
                    error,
                    retry_delay_s(job.attempt_count + 1, settings),
                )
            )
            if counters is not None:
                counters.add("billing_reconciliation_runs_failed_total")
            log.error("BILLING_RECONCILE_FAILED", error=error, attempt_count=attempts, exc_info=exc)
            return False
        done = await asyncio.shield(
            pool.fetchval(query("reconcile_complete_job"), job.id, token, result.drift_pct)
        )
        if counters is not None:
            counters.add("billing_reconciliation_runs_ok_total")
        log.info(
            "BILLING_RECONCILE_OK",
            event_count=result.event_count,
            overage_count=result.overage_count,
            redis_value=result.redis_value,
            drift_abs=result.drift_abs,
            drift_pct=result.drift_pct,
            corrected=result.corrected,
            redis_status=result.redis_status,
            lease_lost=done is None,
        )
        return True


async def run_jobs(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    *,
    limit: int | None = None,
    worker_id: str = "reconciler",
    settings: JobSettings = JobSettings(),
    counters: BillingCounters | None = None,
) -> RunResult:
    """Claim up to `limit` due jobs in one statement and reconcile them, a few at a time."""
    limit = settings.run_limit if limit is None else limit
    token = f"{worker_id}:{uuid.uuid4().hex[:12]}"
    jobs = await claim_jobs(pool, limit=limit, token=token, settings=settings)
    if not jobs:
        return RunResult(processed=0, completed=0, failed=0)
    gate = asyncio.Semaphore(max(1, settings.concurrency))
    started: set[int] = set()

    async def guarded(job: ClaimedJob) -> bool:
        async with gate:
            started.add(job.id)
            return await _run_one(pool, redis, job, token, settings, counters)

    tasks = [asyncio.create_task(guarded(job)) for job in jobs]
    try:
        outcomes = await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        # Shutdown: hand the claimed jobs back at once instead of waiting out their lease.
        await asyncio.shield(pool.execute(query("reconcile_release_jobs"), [j.id for j in jobs], token))
        raise
    completed = sum(1 for ok in outcomes if ok)
    return RunResult(processed=len(jobs), completed=completed, failed=len(jobs) - completed)


def job_counts_reply(enqueue: EnqueueResult | None, run: RunResult | None) -> dict[str, Any]:
    """The §8 reply fields of an enqueue and/or a run."""
    reply: dict[str, Any] = {"ok": True}
    if enqueue is not None:
        reply["enqueued"] = enqueue.enqueued
    if run is not None:
        reply.update(processed=run.processed, completed=run.completed, failed=run.failed)
    return reply


def pairs(site_ids: Sequence[uuid.UUID], months: Sequence[str]) -> tuple[list[uuid.UUID], list[str]]:
    """Cartesian product as two parallel arrays (for the unnest-based SQL)."""
    return [s for s in site_ids for _ in months], [m for _ in site_ids for m in months]
