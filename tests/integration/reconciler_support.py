"""Arranging rows for the reconciler tests the way the gateway would have written them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from shared.months import month_first_day, month_start

INSERT_ROWS = """
INSERT INTO ingest_idempotency (site_id, idempotency_key, idempotency_version, bucket_at, created_at,
                                expires_at, billing_state, billable, billing_reason)
SELECT $1::uuid, $2::text || '-' || g, 1, $3::timestamptz + g * interval '1 millisecond',
       $3::timestamptz + g * interval '1 millisecond',
       $3::timestamptz + g * interval '1 millisecond' + interval '2160 hours',
       $5::billing_state, $6::boolean, $7::text
FROM generate_series(1, $4::integer) AS g
"""


async def create_site(db: asyncpg.Connection, public_id: str | None = None) -> uuid.UUID:
    site_id: uuid.UUID = await db.fetchval(
        "INSERT INTO sites (public_id, name) VALUES ($1, 'test') RETURNING id",
        public_id or f"site-{uuid.uuid4().hex[:10]}",
    )
    return site_id


async def ensure_month(db: asyncpg.Connection, year_month: str) -> None:
    await db.execute("SELECT ingest_idempotency_ensure_partitions($1::date, 1)", month_first_day(year_month))


async def add_rows(
    db: asyncpg.Connection,
    site_id: uuid.UUID,
    year_month: str | None = None,
    count: int = 1,
    *,
    at: datetime | None = None,
    state: str = "ACCEPTED",
    billable: bool = True,
    reason: str | None = None,
) -> None:
    """`count` idempotency rows of a site, 1 ms apart from `at` (default: 1 h into the month)."""
    start = at if at is not None else month_start(year_month or "") + timedelta(hours=1)
    await db.execute(INSERT_ROWS, site_id, f"k-{uuid.uuid4().hex}", start, count, state, billable, reason)


async def job(db: asyncpg.Connection, site_id: uuid.UUID, year_month: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow(
        "SELECT * FROM billing_reconciliation_jobs WHERE site_id = $1 AND year_month = $2",
        site_id,
        year_month,
    )
    return row


async def poll(
    check: Callable[[], Awaitable[Any]], *, timeout_s: float = 30.0, interval_s: float = 0.05
) -> Any:
    """Poll until `check()` is truthy (returns it); AssertionError at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not reached within {timeout_s}s (last value {value!r})")
        await asyncio.sleep(interval_s)
