"""`ingest_idempotency` partitioning and month columns (SPEC §4, §7; docs/architecture.md "Idempotency and
partitioning"): one row per key however the table is partitioned, monthly partitions ahead of time, a
DEFAULT safety net that partition maintenance empties, and `year_month` checked everywhere."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg
import pytest

from shared.months import add_months, current_year_month, month_start

INSERT_KEY = """
INSERT INTO ingest_idempotency (site_id, idempotency_key, bucket_at, created_at)
VALUES ($1, $2, $3::timestamptz, $4::timestamptz)
ON CONFLICT DO NOTHING
RETURNING id
"""


@pytest.fixture
async def site_id(db: asyncpg.Connection) -> uuid.UUID:
    value: uuid.UUID = await db.fetchval("INSERT INTO sites (public_id) VALUES ('part-site') RETURNING id")
    return value


async def partitions(db: asyncpg.Connection) -> set[str]:
    rows = await db.fetch(
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'ingest_idempotency'::regclass"
    )
    return {r[0] for r in rows}


async def rows_of(db: asyncpg.Connection, site: uuid.UUID, key: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT id, tableoid::regclass::text AS part, year_month, created_at, bucket_at"
        " FROM ingest_idempotency WHERE site_id = $1 AND idempotency_key = $2",
        site,
        key,
    )


def ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


async def test_current_and_next_two_months_have_partitions_after_migrate(db: asyncpg.Connection) -> None:
    months = [add_months(current_year_month(), i) for i in range(3)]
    names = {m: "ingest_idempotency_p" + m.replace("-", "_") for m in months}
    assert set(names.values()) | {"ingest_idempotency_default"} <= await partitions(db)
    # Each covers exactly its UTC month.
    await db.execute("SET TIME ZONE 'UTC'")
    for m, name in names.items():
        bound = await db.fetchval(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = $1", name
        )
        lo, hi = month_start(m), month_start(add_months(m, 1))
        assert bound == f"FOR VALUES FROM ('{lo:%Y-%m-%d} 00:00:00+00') TO ('{hi:%Y-%m-%d} 00:00:00+00')"


async def test_rows_of_a_month_land_in_its_partition(db: asyncpg.Connection, site_id: uuid.UUID) -> None:
    now = dt.datetime.now(dt.UTC)
    await db.fetchval(INSERT_KEY, site_id, "k-now", now, now)
    [row] = await rows_of(db, site_id, "k-now")
    assert row["part"] == f"ingest_idempotency_p{now:%Y_%m}"


async def test_a_month_without_partition_uses_default_until_maintenance_moves_it(
    db: asyncpg.Connection, site_id: uuid.UUID
) -> None:
    assert "ingest_idempotency_p2030_01" not in await partitions(db)
    # A column added by a later migration moves with the row too.
    await db.execute("ALTER TABLE ingest_idempotency ADD COLUMN later_column text")
    inserted = await db.fetchval(
        INSERT_KEY, site_id, "k-2030", ts("2030-01-15T10:00:00+00:00"), ts("2030-01-15T10:00:01+00:00")
    )
    assert inserted is not None
    await db.execute(
        "UPDATE ingest_idempotency SET later_column = 'kept', billing_state = 'OVERAGE',"
        " billing_reason = 'r', event_category = 'c', event_action = 'a', event_label = 'l',"
        " idempotency_version = 2"
    )
    [row] = await rows_of(db, site_id, "k-2030")
    assert (row["part"], row["year_month"]) == ("ingest_idempotency_default", "2030-01")
    whole_row = "SELECT to_jsonb(i) FROM ingest_idempotency i WHERE idempotency_key = 'k-2030'"
    before = await db.fetchval(whole_row)
    # The default partition still deduplicates.
    assert (
        await db.fetchval(
            INSERT_KEY, site_id, "k-2030", ts("2030-01-15T10:00:00+00:00"), ts("2030-01-15T10:00:04+00:00")
        )
        is None
    )

    assert await db.fetchval("SELECT ingest_idempotency_ensure_partitions('2030-01-01', 1)") == 1
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency_default") == 0
    [moved] = await rows_of(db, site_id, "k-2030")
    assert moved["part"] == "ingest_idempotency_p2030_01"
    assert (moved["id"], moved["year_month"], moved["created_at"]) == (
        row["id"],
        "2030-01",
        row["created_at"],
    )
    assert await db.fetchval(whole_row) == before
    assert before["later_column"] == "kept"

    # The new partition has the key constraint, indexes and RLS of the parent, and more rows route to it.
    assert (
        await db.fetchval(
            INSERT_KEY, site_id, "k-2030", ts("2030-01-15T10:00:00+00:00"), ts("2030-01-15T10:00:04+00:00")
        )
        is None
    )
    await db.fetchval(
        INSERT_KEY, site_id, "k-2030-b", ts("2030-01-31T23:59:55+00:00"), ts("2030-01-31T23:59:56+00:00")
    )
    [other] = await rows_of(db, site_id, "k-2030-b")
    assert other["part"] == "ingest_idempotency_p2030_01"
    index_count = "SELECT count(*) FROM pg_indexes WHERE tablename = $1"
    assert await db.fetchval(index_count, "ingest_idempotency_p2030_01") == await db.fetchval(
        index_count, "ingest_idempotency"
    )
    # Running again creates nothing.
    assert await db.fetchval("SELECT ingest_idempotency_ensure_partitions('2030-01-01', 1)") == 0


async def test_ensure_partitions_creates_past_months_and_rejects_silly_spans(db: asyncpg.Connection) -> None:
    assert await db.fetchval("SELECT ingest_idempotency_ensure_partitions('2020-11-15', 3)") == 3
    assert {"ingest_idempotency_p2020_11", "ingest_idempotency_p2020_12", "ingest_idempotency_p2021_01"} <= (
        await partitions(db)
    )
    for months in (0, 121):
        with pytest.raises(asyncpg.RaiseError, match="p_months must be between 1 and 120"):
            await db.execute("SELECT ingest_idempotency_ensure_partitions('2040-01-01', $1)", months)


# --- one row per key ----------------------------------------------------------------------------------


async def test_same_key_at_two_instants_of_the_last_bucket_of_a_month_is_one_row(
    db: asyncpg.Connection, site_id: uuid.UUID
) -> None:
    await db.execute("SELECT ingest_idempotency_ensure_partitions('2026-11-01', 2)")
    bucket = ts("2026-11-30T23:59:55+00:00")
    first = await db.fetchval(INSERT_KEY, site_id, "k-edge", bucket, ts("2026-11-30T23:59:56+00:00"))
    second = await db.fetchval(INSERT_KEY, site_id, "k-edge", bucket, ts("2026-11-30T23:59:59.900+00:00"))
    assert first is not None and second is None
    [row] = await rows_of(db, site_id, "k-edge")
    assert (row["part"], row["year_month"]) == ("ingest_idempotency_p2026_11", "2026-11")


async def test_same_key_and_bucket_with_created_at_on_both_sides_of_midnight_is_one_row(
    db: asyncpg.Connection, site_id: uuid.UUID
) -> None:
    # A v2 key timed by the client clock: its retry arrives after the month changed.
    await db.execute("SELECT ingest_idempotency_ensure_partitions('2026-11-01', 2)")
    bucket = ts("2026-11-30T23:59:55+00:00")
    first = await db.fetchval(INSERT_KEY, site_id, "k-cross", bucket, ts("2026-11-30T23:59:58+00:00"))
    second = await db.fetchval(INSERT_KEY, site_id, "k-cross", bucket, ts("2026-12-01T00:00:01+00:00"))
    assert first is not None and second is None
    [row] = await rows_of(db, site_id, "k-cross")
    assert (row["part"], row["year_month"]) == ("ingest_idempotency_p2026_11", "2026-11")


async def test_one_key_is_unique_per_site_only(db: asyncpg.Connection, site_id: uuid.UUID) -> None:
    other: uuid.UUID = await db.fetchval("INSERT INTO sites (public_id) VALUES ('other') RETURNING id")
    now = dt.datetime.now(dt.UTC)
    assert await db.fetchval(INSERT_KEY, site_id, "shared-key", now, now) is not None
    assert await db.fetchval(INSERT_KEY, other, "shared-key", now, now) is not None


# --- months and expiry ----------------------------------------------------------------------------------


async def test_year_month_is_the_utc_month_of_created_at_whatever_the_session_time_zone(
    db: asyncpg.Connection, site_id: uuid.UUID
) -> None:
    await db.execute("SET TIME ZONE 'Europe/Istanbul'")  # UTC+3: the instant below is March there
    await db.execute("SELECT ingest_idempotency_ensure_partitions('2026-02-01', 2)")
    instant = "2026-03-01 01:30+03"  # = 2026-02-28 22:30 UTC
    year_month = await db.fetchval(
        "INSERT INTO ingest_idempotency (site_id, idempotency_key, bucket_at, created_at)"
        " VALUES ($1, 'k-tz', $2::text::timestamptz, $2::text::timestamptz) RETURNING year_month",
        site_id,
        instant,
    )
    assert year_month == "2026-02"
    assert await db.fetchval("SELECT to_char($1::text::timestamptz, 'YYYY-MM')", instant) == "2026-03"


async def test_year_month_of_ingest_rows_cannot_be_written(
    db: asyncpg.Connection, site_id: uuid.UUID
) -> None:
    with pytest.raises(asyncpg.GeneratedAlwaysError):
        await db.execute(
            "INSERT INTO ingest_idempotency (site_id, idempotency_key, bucket_at, year_month)"
            " VALUES ($1, 'k', now(), '2020-01')",
            site_id,
        )


async def test_expires_at_is_created_at_plus_90_days_unless_given(
    db: asyncpg.Connection, site_id: uuid.UUID
) -> None:
    created = ts("2030-01-15T10:00:00+00:00")  # ahead of the database clock: a now()-based default fails
    await db.fetchval(INSERT_KEY, site_id, "k-exp", created, created)
    assert await db.fetchval(
        "SELECT expires_at - created_at FROM ingest_idempotency WHERE idempotency_key = 'k-exp'"
    ) == dt.timedelta(days=90)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "INSERT INTO ingest_idempotency (site_id, idempotency_key, bucket_at, created_at, expires_at)"
            " VALUES ($1, 'k-short', $2::timestamptz, $2::timestamptz, $2::timestamptz + interval '89 days')",
            site_id,
            created,
        )


async def test_malformed_year_month_is_refused_everywhere(db: asyncpg.Connection, site_id: uuid.UUID) -> None:
    statements = [
        "INSERT INTO site_usage_monthly (site_id, year_month) VALUES ($1, $2)",
        "INSERT INTO invoice_snapshot (site_id, year_month, event_count, overage_count, snapshot_hash,"
        " commit_sha, generated_by) VALUES ($1, $2, 0, 0, 'h', 's', 't')",
        "INSERT INTO billing_reconciliation_jobs (site_id, year_month) VALUES ($1, $2)",
        "INSERT INTO billing_audit_log (action, actor, site_id, year_month) VALUES ('x', 'y', $1, $2)",
    ]
    accepted = []
    for statement in statements:
        for bad_month in ("2026-13", "2026-1", "abcd-ef", "2026-00", "2026-011", " 2026-01", ""):
            try:
                await db.execute(statement, site_id, bad_month)
            except asyncpg.CheckViolationError:
                continue
            accepted.append((statement.split("(")[0], bad_month))
        await db.execute(statement, site_id, "2026-12")
    assert accepted == []


async def test_a_temporary_table_named_like_a_partition_does_not_stand_in_for_it(
    db: asyncpg.Connection,
) -> None:
    """ensure_partitions found a session's temporary table by the partition's name and skipped the
    month (its rows would have gone to DEFAULT); it looks in `public` only (migration 0026)."""
    await db.execute("CREATE TEMP TABLE ingest_idempotency_p2031_07 (x int)")
    assert await db.fetchval("SELECT ingest_idempotency_ensure_partitions('2031-07-01'::date, 1)") == 1
    assert await db.fetchval("SELECT to_regclass('public.ingest_idempotency_p2031_07') IS NOT NULL")
