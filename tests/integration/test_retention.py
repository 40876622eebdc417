"""Retention (SPEC §7) against real Postgres: rows aged by SQL in old month partitions, run as the
fleet's role (which has no DDL of its own)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.freezer.main import Freezer, FreezerConfig
from shared.db import SERVICE_ROLE, create_pool
from shared.freeze import freeze_month
from shared.months import add_months, current_year_month, month_start
from shared.retention import RetentionSettings, run_retention
from shared.settings import Settings
from tests.integration.reconciler_support import poll

NOW = datetime.now(UTC)
CURRENT = current_year_month(NOW)
PREVIOUS = add_months(CURRENT, -1)
EXPIRED_MONTH = add_months(CURRENT, -6)  # every row expired: dropped
PARTLY_MONTH = add_months(CURRENT, -4)  # some rows expired: trimmed
LIVE_MONTH = add_months(CURRENT, -3)  # no row expired: untouched
DEFAULT_MONTH = add_months(CURRENT, -8)  # no partition: its rows sit in the DEFAULT partition
NINETY_DAYS = timedelta(hours=2160)


def part(month: str) -> str:
    return "ingest_idempotency_p" + month.replace("-", "_")


async def partitions(db: asyncpg.Connection) -> set[str]:
    rows = await db.fetch(
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'ingest_idempotency'::regclass"
    )
    return {r[0] for r in rows}


async def add_row(
    db: asyncpg.Connection,
    site: uuid.UUID,
    key: str,
    *,
    bucket_at: datetime,
    created_at: datetime | None = None,
    expires_at: datetime | None = None,
) -> None:
    created = created_at or bucket_at
    await db.execute(
        """INSERT INTO ingest_idempotency (site_id, idempotency_key, bucket_at, created_at, expires_at)
           VALUES ($1, $2, $3, $4, $5)""",
        site,
        key,
        bucket_at,
        created,
        expires_at or created + NINETY_DAYS,
    )


async def keys(db: asyncpg.Connection) -> set[str]:
    return {r[0] for r in await db.fetch("SELECT idempotency_key FROM ingest_idempotency")}


@pytest.fixture
async def site(db: asyncpg.Connection) -> uuid.UUID:
    value: uuid.UUID = await db.fetchval(
        "INSERT INTO sites (public_id) VALUES ('retention-site') RETURNING id"
    )
    return value


@pytest.fixture
async def aged(db: asyncpg.Connection, site: uuid.UUID) -> None:
    """Old partitions and rows of every kind retention must tell apart."""
    for month in (EXPIRED_MONTH, PARTLY_MONTH, LIVE_MONTH, PREVIOUS):
        await db.execute(
            "SELECT ingest_idempotency_ensure_partitions($1::date, 1)", month_start(month).date()
        )
    soon = NOW + timedelta(days=10)
    for i in range(3):
        await add_row(db, site, f"expired-{i}", bucket_at=month_start(EXPIRED_MONTH) + timedelta(days=i))
    for i in range(5):
        await add_row(
            db, site, f"partly-expired-{i}", bucket_at=month_start(PARTLY_MONTH) + timedelta(hours=i)
        )
    # Kept longer than 90 days (expires_at may be later, never earlier).
    await add_row(
        db, site, "partly-live", bucket_at=month_start(PARTLY_MONTH) + timedelta(days=1), expires_at=soon
    )
    await add_row(
        db, site, "live-month", bucket_at=month_start(LIVE_MONTH) + timedelta(days=1), expires_at=soon
    )
    # Rows of the current and previous month whose expires_at has passed (created_at set 100 days back,
    # which the schema allows): the month guard alone must keep them.
    old_created = NOW - timedelta(days=100)
    for month in (CURRENT, PREVIOUS):
        await add_row(
            db,
            site,
            f"open-{month}",
            bucket_at=month_start(month) + timedelta(minutes=1),
            created_at=old_created,
        )
    # The DEFAULT partition: an expired row of an old month, and one still alive.
    await add_row(db, site, "default-expired", bucket_at=month_start(DEFAULT_MONTH) + timedelta(days=2))
    await add_row(
        db, site, "default-live", bucket_at=month_start(DEFAULT_MONTH) + timedelta(days=3), expires_at=soon
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM ingest_idempotency_default WHERE idempotency_key LIKE 'default-%'"
        )
        == 2
    )
    # The closed months are invoiced, as the freezer leaves them: only then may their rows go.
    for month in (EXPIRED_MONTH, PARTLY_MONTH, LIVE_MONTH, DEFAULT_MONTH):
        await freeze(db, site, month)


async def freeze(db: asyncpg.Connection, site: uuid.UUID, month: str) -> None:
    """A snapshot of (site, month), as the freeze writes it (the counts do not matter here)."""
    await db.execute(
        """INSERT INTO invoice_snapshot (site_id, year_month, event_count, overage_count, snapshot_hash,
                                         commit_sha, generated_by)
           VALUES ($1, $2, 0, 0, 'h', 'test', 'test')""",
        site,
        month,
    )


async def as_service(db: asyncpg.Connection) -> asyncpg.Connection:
    await db.execute(f"SET ROLE {SERVICE_ROLE}")
    return db


async def test_retention_drops_expired_partitions_trims_partly_expired_and_keeps_the_rest(
    db: asyncpg.Connection, aged: None
) -> None:
    live_before = await db.fetchval("SELECT count(*) FROM ingest_idempotency WHERE expires_at >= now()")
    before_parts = await partitions(db)
    report = await run_retention(await as_service(db), RetentionSettings(batch_rows=2))
    await db.execute("RESET ROLE")

    assert report.ran
    assert report.dropped == [part(EXPIRED_MONTH)]
    # 5 expired rows of the partly expired month, in batches of 2; the expired DEFAULT row.
    assert report.trimmed == {part(PARTLY_MONTH): 5, "ingest_idempotency_default": 1}
    assert report.kept == [part(PARTLY_MONTH), part(LIVE_MONTH)]
    assert not report.busy and not report.more_pending

    after_parts = await partitions(db)
    assert after_parts == before_parts - {part(EXPIRED_MONTH)}
    assert {
        part(CURRENT),
        part(PREVIOUS),
        part(add_months(CURRENT, 1)),
        part(add_months(CURRENT, 2)),
    } <= after_parts
    assert await keys(db) == {
        "partly-live",
        "live-month",
        f"open-{CURRENT}",
        f"open-{PREVIOUS}",
        "default-live",
    }
    # Nothing unexpired was removed.
    assert (
        await db.fetchval("SELECT count(*) FROM ingest_idempotency WHERE expires_at >= now()") == live_before
    )

    # One audit row says what was removed.
    [audit] = await db.fetch("SELECT * FROM billing_audit_log WHERE action = 'retention'")
    assert audit["details"]["dropped_partitions"] == [part(EXPIRED_MONTH)]
    assert audit["details"]["trimmed_total"] == 6

    # A second run finds nothing more to do, and records nothing.
    again = await run_retention(await as_service(db))
    await db.execute("RESET ROLE")
    assert (again.dropped, again.trimmed) == ([], {})
    assert await db.fetchval("SELECT count(*) FROM billing_audit_log WHERE action = 'retention'") == 1


async def test_billable_rows_no_snapshot_counted_are_kept_until_their_month_is_frozen(
    db: asyncpg.Connection, site: uuid.UUID, database_url: str
) -> None:
    """The invoice of a month without a snapshot is the live COUNT of its billable rows: retention must
    not remove one of them, however expired, or the freeze that comes later invoices less (or nothing).
    Such a partition is left whole (not emptied row by row) and dropped once the month is frozen."""
    await db.execute(
        "SELECT ingest_idempotency_ensure_partitions($1::date, 1)", month_start(EXPIRED_MONTH).date()
    )
    other: uuid.UUID = await db.fetchval("INSERT INTO sites (public_id) VALUES ('frozen-site') RETURNING id")
    at = month_start(EXPIRED_MONTH) + timedelta(days=3)
    for i in range(3):
        await add_row(db, site, f"unfrozen-{i}", bucket_at=at + timedelta(minutes=i))
    await add_row(db, other, "frozen-0", bucket_at=at)
    await freeze(db, other, EXPIRED_MONTH)

    report = await run_retention(await as_service(db))
    await db.execute("RESET ROLE")
    assert (report.dropped, report.unfrozen, report.trimmed) == ([], [part(EXPIRED_MONTH)], {})
    assert await keys(db) == {"unfrozen-0", "unfrozen-1", "unfrozen-2", "frozen-0"}

    # The freezer catches up; the next run drops the month.
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        frozen = await freeze_month(pool, EXPIRED_MONTH, commit_sha="c", generated_by="t")
    finally:
        await pool.close()
    assert frozen.inserted == 1
    assert (
        await db.fetchval(
            "SELECT event_count FROM invoice_snapshot WHERE site_id = $1 AND year_month = $2",
            site,
            EXPIRED_MONTH,
        )
        == 3
    )
    again = await run_retention(await as_service(db))
    await db.execute("RESET ROLE")
    assert again.dropped == [part(EXPIRED_MONTH)] and again.unfrozen == []


async def test_an_imported_row_billed_to_a_distant_month_keeps_its_partition(
    db: asyncpg.Connection, site: uuid.UUID
) -> None:
    """Rows are partitioned by bucket_at and billed by created_at's month; a row written by SQL may put
    them months apart. The drop must look at the months the partition's rows really bill to."""
    await db.execute(
        "SELECT ingest_idempotency_ensure_partitions($1::date, 1)", month_start(EXPIRED_MONTH).date()
    )
    billed_month = add_months(EXPIRED_MONTH, -3)
    await add_row(
        db,
        site,
        "imported",
        bucket_at=month_start(EXPIRED_MONTH) + timedelta(days=2),
        created_at=month_start(billed_month) + timedelta(days=2),
    )
    await freeze(db, site, EXPIRED_MONTH)  # the partition's own month and its neighbours are frozen
    await freeze(db, site, add_months(EXPIRED_MONTH, -1))
    await freeze(db, site, add_months(EXPIRED_MONTH, 1))
    await as_service(db)
    assert (
        await db.fetchval("SELECT ingest_idempotency_drop_expired_partition($1)", part(EXPIRED_MONTH))
        == "unfrozen_rows"
    )
    await freeze(db, site, billed_month)
    assert (
        await db.fetchval("SELECT ingest_idempotency_drop_expired_partition($1)", part(EXPIRED_MONTH))
        == "dropped"
    )
    await db.execute("RESET ROLE")


async def test_trimming_a_partly_expired_partition_spares_unfrozen_billable_rows(
    db: asyncpg.Connection, site: uuid.UUID
) -> None:
    await db.execute(
        "SELECT ingest_idempotency_ensure_partitions($1::date, 1)", month_start(PARTLY_MONTH).date()
    )
    other: uuid.UUID = await db.fetchval("INSERT INTO sites (public_id) VALUES ('frozen-site') RETURNING id")
    at = month_start(PARTLY_MONTH) + timedelta(days=3)
    await add_row(db, site, "unfrozen-billable", bucket_at=at)
    await add_row(db, site, "unfrozen-rejected", bucket_at=at + timedelta(minutes=1))
    await db.execute(
        "UPDATE ingest_idempotency SET billable = false, billing_reason = 'rejected_quota'"
        " WHERE idempotency_key = 'unfrozen-rejected'"
    )
    await add_row(db, other, "frozen", bucket_at=at)
    await add_row(db, other, "live", bucket_at=at, expires_at=NOW + timedelta(days=10))
    await freeze(db, other, PARTLY_MONTH)

    report = await run_retention(await as_service(db))
    await db.execute("RESET ROLE")
    # Deleted: the frozen site's expired row and the rejected (not billable) row.
    assert report.trimmed == {part(PARTLY_MONTH): 2} and report.kept == [part(PARTLY_MONTH)]
    assert await keys(db) == {"unfrozen-billable", "live"}


async def test_freezer_start_up_invoices_an_expired_unfrozen_month_whole(
    db: asyncpg.Connection, site: uuid.UUID, settings: Settings
) -> None:
    """A freezer that was down over a month's end starts with its freeze catch-up and its retention run
    at once. Retention used to drop the month's partition first (no invoice) or between the freeze's
    site list and its count (an immutable zero invoice)."""
    month = add_months(CURRENT, -4)
    await db.execute("SELECT ingest_idempotency_ensure_partitions($1::date, 1)", month_start(month).date())
    at = month_start(month) + timedelta(days=2)
    for i in range(20):
        await add_row(db, site, f"late-{i}", bucket_at=at + timedelta(hours=i))
    freezer = Freezer(settings, FreezerConfig(http_port=0, drain_timeout_s=5))
    await freezer.worker.start()
    try:
        snapshot = await poll(
            lambda: db.fetchval(
                "SELECT event_count FROM invoice_snapshot WHERE site_id = $1 AND year_month = $2", site, month
            ),
            timeout_s=30,
        )
        retention_ran = await poll(
            lambda: db.fetchval("SELECT count(*) FROM billing_audit_log WHERE action = 'retention'"),
            timeout_s=30,
        )
    finally:
        await freezer.worker.stop()
    assert snapshot == 20 and retention_ran == 1
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency WHERE year_month = $1", month) == 0


async def test_the_database_guards_hold_whatever_the_caller_asks(db: asyncpg.Connection, aged: None) -> None:
    await as_service(db)
    for month in (CURRENT, PREVIOUS):
        assert (
            await db.fetchval("SELECT ingest_idempotency_drop_expired_partition($1)", part(month))
            == "protected"
        )
        assert await db.fetchval("SELECT ingest_idempotency_trim_expired($1, 100)", part(month)) == 0
    assert (
        await db.fetchval("SELECT ingest_idempotency_drop_expired_partition($1)", part(LIVE_MONTH))
        == "unexpired_rows"
    )
    for name in ("sites", "ingest_idempotency", "ingest_idempotency_p1999_01"):
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await db.fetchval("SELECT ingest_idempotency_drop_expired_partition($1)", name)
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await db.fetchval("SELECT ingest_idempotency_trim_expired($1, 100)", name)
    # The role itself still has no DDL: only the guarded functions can drop.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.execute(f"DROP TABLE {part(EXPIRED_MONTH)}")
    await db.execute("RESET ROLE")
    assert f"open-{CURRENT}" in await keys(db) and f"open-{PREVIOUS}" in await keys(db)


async def test_tenants_cannot_run_retention(db: asyncpg.Connection, aged: None) -> None:
    await db.execute("SET ROLE revkernel_tenant")
    for sql in (
        "SELECT ingest_idempotency_drop_expired_partition('ingest_idempotency_p2000_01')",
        "SELECT ingest_idempotency_trim_expired('ingest_idempotency_default', 10)",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.fetchval(sql)
    await db.execute("RESET ROLE")


async def test_a_partition_in_use_is_left_for_the_next_run_instead_of_blocking_ingest(
    db: asyncpg.Connection, database_url: str, aged: None, site: uuid.UUID
) -> None:
    """Dropping needs an ACCESS EXCLUSIVE lock on the parent: with a long reader in the way, retention
    gives up on that partition after its lock_timeout instead of queueing every insert behind it."""
    reader = await asyncpg.connect(database_url)
    try:
        await reader.execute("BEGIN")
        await reader.fetchval("SELECT count(*) FROM ingest_idempotency")
        report = await run_retention(await as_service(db))
        await db.execute("RESET ROLE")
        assert report.busy == [part(EXPIRED_MONTH)]
        assert report.dropped == []
        assert part(EXPIRED_MONTH) in await partitions(db)
        await reader.execute("ROLLBACK")
        assert (await run_retention(db)).dropped == [part(EXPIRED_MONTH)]
    finally:
        await reader.close()


async def test_only_one_retention_runner_at_a_time(
    db: asyncpg.Connection, database_url: str, aged: None
) -> None:
    other = await asyncpg.connect(database_url)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock(hashtextextended('revkernel:retention', 0))")
        report = await run_retention(db)
        assert not report.ran and report.dropped == []
        assert part(EXPIRED_MONTH) in await partitions(db)
    finally:
        await other.close()


async def test_recovered_fallback_rows_are_purged_after_30_days(
    db: asyncpg.Connection, site: uuid.UUID
) -> None:
    async def buffer_row(key: str, status: str, age_days: float) -> None:
        at = NOW - timedelta(days=age_days)
        await db.execute(
            """INSERT INTO ingest_fallback_buffer (site_id, idempotency_key, bucket_at, payload, routing_key,
                                                   error_reason, status, created_at, updated_at)
               VALUES ($1, $2, $3, '{}'::jsonb, 'event.x', 'broker_publish_failed', $4, $3, $3)""",
            site,
            key,
            at,
            status,
        )

    await buffer_row("recovered-31d", "RECOVERED", 31)
    await buffer_row("recovered-45d", "RECOVERED", 45)
    await buffer_row("recovered-29d", "RECOVERED", 29)
    await buffer_row("pending-60d", "PENDING", 60)
    await buffer_row("failed-60d", "FAILED", 60)
    report = await run_retention(await as_service(db), RetentionSettings(batch_rows=1))
    await db.execute("RESET ROLE")
    assert report.fallback_purged == 2
    left = {r[0] for r in await db.fetch("SELECT idempotency_key FROM ingest_fallback_buffer")}
    assert left == {"recovered-29d", "pending-60d", "failed-60d"}


async def test_partition_maintenance_recreates_missing_future_partitions(db: asyncpg.Connection) -> None:
    nxt = part(add_months(CURRENT, 2))
    await db.execute(f"DROP TABLE {nxt}")
    report = await run_retention(await as_service(db))
    await db.execute("RESET ROLE")
    assert report.partitions_created == 1
    assert nxt in await partitions(db)
