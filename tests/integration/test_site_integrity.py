"""Billing rows and their site (migration 0022): what the foreign key guaranteed, now checked per group.

An idempotency row never names a missing site, and a site with rows cannot go away, also when the
capture and the delete race each other.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from shared.queries import query
from tests.integration.reconciler_support import create_site


async def capture(conn: asyncpg.Connection, *site_ids: uuid.UUID) -> list[asyncpg.Record]:
    """One capture group of one new billable event per given site (Redis mode: SHARED locks)."""
    now = datetime.now(UTC)
    n = len(site_ids)
    keys = [hashlib.sha256(os.urandom(16)).hexdigest() for _ in site_ids]
    records: list[asyncpg.Record] = await conn.fetch(
        query("ingest_capture_rows"),
        "shared", list(site_ids), keys, [1] * n, [now] * n, [now] * n, [True] * n,
        [None] * n, [None] * n, ["page_view"] * n, [None] * n,
    )
    return records


async def wait_until_blocked(observer: asyncpg.Connection, pid: int) -> None:
    """Until backend `pid` waits on a lock (no sleeping guess: pg_stat_activity says so)."""
    for _ in range(500):
        state = await observer.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid)
        if state == "Lock":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited on a lock")


async def test_a_group_naming_a_missing_site_is_refused_whole(db: asyncpg.Connection) -> None:
    site = await create_site(db)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        async with db.transaction():
            await capture(db, site, uuid.uuid4())
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency") == 0
    assert len(await capture(db, site, site)) == 2


async def test_a_site_with_billing_rows_cannot_be_deleted_or_rekeyed(db: asyncpg.Connection) -> None:
    billed, unused = await create_site(db), await create_site(db)
    await capture(db, billed)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute("DELETE FROM sites WHERE id = $1", billed)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute("UPDATE sites SET id = gen_random_uuid() WHERE id = $1", billed)
    await db.execute("UPDATE sites SET name = 'renamed' WHERE id = $1", billed)  # other columns: fine
    await db.execute("DELETE FROM sites WHERE id = $1", unused)  # no rows: deletable as before
    assert await db.fetchval("SELECT count(*) FROM sites WHERE id = $1", unused) == 0


async def test_delete_racing_an_open_capture_waits_and_then_fails(
    database_url: str, db: asyncpg.Connection
) -> None:
    site = await create_site(db)
    capturer, deleter = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        tx = capturer.transaction()
        await tx.start()
        await capture(capturer, site)  # uncommitted rows, the site locked FOR KEY SHARE
        deletion = asyncio.ensure_future(deleter.execute("DELETE FROM sites WHERE id = $1", site))
        await wait_until_blocked(db, deleter.get_server_pid())
        await tx.commit()
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await deletion
    finally:
        await capturer.close()
        await deleter.close()
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency WHERE site_id = $1", site) == 1


async def test_capture_racing_an_open_delete_waits_and_then_is_refused(
    database_url: str, db: asyncpg.Connection
) -> None:
    site = await create_site(db)
    capturer, deleter = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        tx = deleter.transaction()
        await tx.start()
        await deleter.execute("DELETE FROM sites WHERE id = $1", site)  # no rows yet: allowed
        attempt = asyncio.ensure_future(capture(capturer, site))
        await wait_until_blocked(db, capturer.get_server_pid())
        await tx.commit()
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await attempt
    finally:
        await capturer.close()
        await deleter.close()
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency WHERE site_id = $1", site) == 0
