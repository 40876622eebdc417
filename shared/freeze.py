"""Invoice freeze (SPEC §9): reconcile every site of a closed month from `ingest_idempotency`, then
write its immutable `invoice_snapshot`.

The month rules and the snapshot hash are pure functions; `freeze_month` is called by the freezer's
command handler and schedule, and by `revkernel freeze`. It reconciles set-based, a chunk of sites per
statement (`freeze_reconcile_sites`): the same count rule as `shared.reconciliation.reconcile_month`
(the tests hold the two equal) and the same `site_usage_monthly` upsert, without the Redis drift check,
which only matters for the open month the gate reserves against.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from shared.logging import get_logger
from shared.months import add_months, current_year_month, is_year_month, month_start
from shared.queries import query

log = get_logger("freeze")

AUDIT_ACTION = "invoice_freeze"
# After midnight of the 1st, events of the last instants of the month may still be committing; the
# scheduled freeze waits this long (SPEC §2: 00:10 UTC on the 1st).
FREEZE_GRACE = timedelta(minutes=10)
DEFAULT_CHUNK_SITES = 500
LOCK_WAIT_S = 600.0


class FreezeRefused(ValueError):
    """A month that cannot be frozen (malformed, current or future): a 400 with `code`."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def snapshot_hash(
    site_id: uuid.UUID, year_month: str, event_count: int, overage_count: int, commit_sha: str
) -> str:
    """sha256_hex(f"{site_id}:{year_month}:{event_count}:{overage_count}:{commit_sha}") (SPEC §9)."""
    material = f"{str(site_id).lower()}:{year_month}:{event_count}:{overage_count}:{commit_sha}"
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def default_freeze_month(now: datetime | None = None) -> str:
    """The previous UTC month (the month a freeze without arguments closes)."""
    return add_months(current_year_month(now), -1)


def freezable_month(value: object, now: datetime | None = None) -> str:
    """`value` when it is a past month; FreezeRefused for a malformed, current or future one."""
    if value is None:
        return default_freeze_month(now)
    if not is_year_month(value):
        raise FreezeRefused("invalid_year_month", "`year_month` must be a YYYY-MM month")
    assert isinstance(value, str)
    current = current_year_month(now)
    if value == current:
        raise FreezeRefused(
            "month_not_closed", f"{value} is the current month; only past months can be frozen"
        )
    if value > current:
        raise FreezeRefused("month_not_closed", f"{value} is in the future; only past months can be frozen")
    return value


def scheduled_freeze_month(now: datetime) -> str:
    """The month the schedule should have frozen by `now`: the previous month once 00:10 UTC of the
    1st has passed, else the one before it."""
    current = current_year_month(now)
    if now < month_start(current) + FREEZE_GRACE:
        return add_months(current, -2)
    return add_months(current, -1)


@dataclass(frozen=True, slots=True)
class FreezeResult:
    year_month: str
    inserted: int
    skipped: int
    total_sites: int
    commit_sha: str
    generated_by: str
    duration_ms: float

    def reply(self) -> dict[str, Any]:
        """The SPEC §9 body (the gateway adds `request_id`)."""
        return {
            "ok": True,
            "year_month": self.year_month,
            "inserted": self.inserted,
            "skipped": self.skipped,
            "total_sites": self.total_sites,
        }


async def sites_with_rows(conn: asyncpg.Connection | asyncpg.Pool, year_month: str) -> list[uuid.UUID]:
    return [r["id"] for r in await conn.fetch(query("freeze_sites_with_rows"), year_month)]


async def unfrozen_site_count(conn: asyncpg.Connection | asyncpg.Pool, year_month: str) -> int:
    """Sites with rows in the month and no snapshot of it."""
    return int(await conn.fetchval(query("freeze_unfrozen_site_count"), year_month))


async def _freeze_chunk(
    pool: asyncpg.Pool, site_ids: list[uuid.UUID], year_month: str, commit_sha: str, generated_by: str
) -> int:
    """Reconcile a chunk of sites and insert their snapshots, in one transaction; how many inserted."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.fetchval(query("freeze_lock_sites"), site_ids, year_month)
        counted = await conn.fetch(query("freeze_reconcile_sites"), site_ids, year_month)
        ids = [r["site_id"] for r in counted]
        events = [int(r["event_count"]) for r in counted]
        overages = [int(r["overage_count"]) for r in counted]
        hashes = [
            snapshot_hash(site_id, year_month, e, o, commit_sha)
            for site_id, e, o in zip(ids, events, overages, strict=True)
        ]
        inserted = await conn.fetch(
            query("freeze_insert_snapshots"),
            ids,
            year_month,
            events,
            overages,
            hashes,
            commit_sha,
            generated_by,
        )
    return len(inserted)


async def _unlock(conn: asyncpg.Connection, year_month: str) -> None:
    try:
        await conn.fetchval(query("freeze_unlock_month"), year_month)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # The pool's reset of a returned connection (or its closing) releases the lock anyway.
        log.warning("freeze_unlock_failed", year_month=year_month, error=str(exc) or type(exc).__name__)


async def freeze_month(
    pool: asyncpg.Pool,
    year_month: str | None,
    *,
    commit_sha: str,
    generated_by: str,
    request_id: str | None = None,
    trigger: str = "command",
    chunk_sites: int = DEFAULT_CHUNK_SITES,
    now: datetime | None = None,
) -> FreezeResult:
    """Freeze a past month (default: the previous one) for every site with rows in it: reconcile its
    usage from `ingest_idempotency`, then insert its snapshot, one transaction per chunk of sites.

    Sites whose snapshot exists are counted as `skipped` (their snapshot is never touched). Freezes of
    one month are serialised fleet-wide, so a second run waits for the first and then inserts nothing.
    One audit row per run; FreezeRefused for the current or a future month.
    """
    month = freezable_month(year_month, now or datetime.now(UTC))
    started = time.perf_counter()
    async with pool.acquire() as lock_conn:
        await lock_conn.fetchval(query("freeze_lock_month"), month, timeout=LOCK_WAIT_S)
        try:
            site_ids = await sites_with_rows(lock_conn, month)
            inserted = 0
            for start in range(0, len(site_ids), max(1, chunk_sites)):
                chunk = site_ids[start : start + max(1, chunk_sites)]
                inserted += await _freeze_chunk(pool, chunk, month, commit_sha, generated_by)
            result = FreezeResult(
                year_month=month,
                inserted=inserted,
                skipped=len(site_ids) - inserted,
                total_sites=len(site_ids),
                commit_sha=commit_sha,
                generated_by=generated_by,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
            await lock_conn.execute(
                query("insert_audit"),
                AUDIT_ACTION,
                generated_by,
                None,
                month,
                request_id,
                {
                    "inserted": result.inserted,
                    "skipped": result.skipped,
                    "total_sites": result.total_sites,
                    "commit_sha": commit_sha,
                    "trigger": trigger,
                    "duration_ms": result.duration_ms,
                },
            )
        except Exception as exc:
            log.error("INVOICE_FREEZE_FAILED", request_id=request_id, year_month=month, error=repr(exc))
            raise
        finally:
            await _unlock(lock_conn, month)
    log.info(
        "INVOICE_FREEZE_COMPLETE",
        request_id=request_id,
        year_month=month,
        inserted=result.inserted,
        skipped=result.skipped,
        total_sites=result.total_sites,
        commit_sha=commit_sha,
        generated_by=generated_by,
        trigger=trigger,
        duration_ms=result.duration_ms,
    )
    return result
