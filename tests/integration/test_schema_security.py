"""Security enforced by Postgres itself (SPEC §1.8, §1.9, §7): the immutable invoice snapshot, the
append-only audit log, the service role without DDL, and tenant reads through row-level security."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from shared.db import SERVICE_ROLE, TENANT_ROLE, tenant_transaction

SNAPSHOT_COLUMNS = (
    "site_id, year_month, event_count, overage_count, snapshot_hash, commit_sha, generated_by"
)
# Every table a tenant may read, and the column that names the site.
TENANT_TABLES = {
    "sites": "id",
    "site_plans": "site_id",
    "site_usage_monthly": "site_id",
    "ingest_idempotency": "site_id",
    "invoice_snapshot": "site_id",
    "billing_reconciliation_jobs": "site_id",
}


@dataclass(frozen=True)
class Tenancy:
    site_a: uuid.UUID
    site_b: uuid.UUID
    month: str


async def insert_site_rows(db: asyncpg.Connection, public_id: str, month: str, now: dt.datetime) -> uuid.UUID:
    """A site with one row in every tenant-readable table."""
    site_id: uuid.UUID = await db.fetchval(
        "INSERT INTO sites (public_id) VALUES ($1) RETURNING id", public_id
    )
    await db.execute("INSERT INTO site_plans (site_id, monthly_limit) VALUES ($1, 100)", site_id)
    await db.execute(
        "INSERT INTO site_usage_monthly (site_id, year_month, event_count) VALUES ($1, $2, 1)", site_id, month
    )
    await db.execute(
        "INSERT INTO ingest_idempotency (site_id, idempotency_key, bucket_at, created_at)"
        " VALUES ($1, $2, $3, $3)",
        site_id,
        f"key-{public_id}",
        now,
    )
    await db.execute(
        f"INSERT INTO invoice_snapshot ({SNAPSHOT_COLUMNS}) VALUES ($1, $2, 1, 0, 'h', 'sha', 'test')",
        site_id,
        month,
    )
    await db.execute(
        "INSERT INTO billing_reconciliation_jobs (site_id, year_month) VALUES ($1, $2)", site_id, month
    )
    return site_id


@pytest.fixture
async def tenancy(db: asyncpg.Connection) -> Tenancy:
    """Sites A and B with rows everywhere; alice views A, bob owns B, root is a platform admin."""
    now = dt.datetime.now(dt.UTC)
    month = now.strftime("%Y-%m")
    site_a = await insert_site_rows(db, "site-a", month, now)
    site_b = await insert_site_rows(db, "site-b", month, now)
    await db.execute(
        "INSERT INTO site_members (site_id, user_id, role) VALUES ($1, 'alice', 'viewer')", site_a
    )
    await db.execute("INSERT INTO site_members (site_id, user_id, role) VALUES ($1, 'bob', 'owner')", site_b)
    await db.execute("INSERT INTO platform_admins (user_id) VALUES ('root')")
    return Tenancy(site_a, site_b, month)


async def as_role(conn: asyncpg.Connection, role: str, sql: str, *args: Any, user_id: str = "") -> str:
    """Run one statement in a read-write transaction as `role` (so only privileges can refuse it)."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL ROLE {role}")
        await conn.execute("SELECT set_config('app.user_id', $1, true)", user_id)
        result: str = await conn.execute(sql, *args)
        return result


async def not_refused(
    conn: asyncpg.Connection, role: str, statements: list[str], *, user_id: str = ""
) -> list[str]:
    """The statements that `role` managed to run (each in its own rolled-back attempt)."""
    passed = []
    for statement in statements:
        try:
            await as_role(conn, role, statement, user_id=user_id)
        except asyncpg.InsufficientPrivilegeError:
            continue
        passed.append(statement)
    return passed


async def snapshot_rows(db: asyncpg.Connection) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await db.fetch("SELECT * FROM invoice_snapshot ORDER BY site_id")]


# --- invoice_snapshot and billing_audit_log: append-only for every role -------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE invoice_snapshot SET event_count = event_count + 1",
        "DELETE FROM invoice_snapshot",
        "TRUNCATE invoice_snapshot",
        "TRUNCATE sites CASCADE",
    ],
)
async def test_invoice_snapshot_cannot_be_changed_by_the_owning_superuser(
    db: asyncpg.Connection, tenancy: Tenancy, statement: str
) -> None:
    before = await snapshot_rows(db)
    assert await db.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="invoice_snapshot is append-only"):
        await db.execute(statement)
    # Replica mode silences ordinary triggers; the snapshot's triggers fire ALWAYS.
    async with db.transaction():
        await db.execute("SET LOCAL session_replication_role = replica")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="invoice_snapshot is append-only"):
            async with db.transaction():
                await db.execute(statement)
    assert await snapshot_rows(db) == before
    assert len(before) == 2


APPEND_ONLY_WRITES = [
    "UPDATE invoice_snapshot SET event_count = 0",
    "DELETE FROM invoice_snapshot",
    "TRUNCATE invoice_snapshot",
    "UPDATE billing_audit_log SET actor = 'someone else'",
    "DELETE FROM billing_audit_log",
    "TRUNCATE billing_audit_log",
]


async def test_service_role_cannot_change_append_only_tables(
    db: asyncpg.Connection, tenancy: Tenancy
) -> None:
    await db.execute("INSERT INTO billing_audit_log (action, actor) VALUES ('freeze', 'test')")
    snapshots, audit = await snapshot_rows(db), await db.fetch("SELECT * FROM billing_audit_log")
    assert await not_refused(db, SERVICE_ROLE, APPEND_ONLY_WRITES) == []
    assert await snapshot_rows(db) == snapshots
    assert await db.fetch("SELECT * FROM billing_audit_log") == audit


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE billing_audit_log SET actor = 'someone else'",
        "DELETE FROM billing_audit_log",
        "TRUNCATE billing_audit_log",
    ],
)
async def test_audit_log_is_append_only_even_for_the_superuser(
    db: asyncpg.Connection, statement: str
) -> None:
    await db.execute("INSERT INTO billing_audit_log (action, actor) VALUES ('freeze', 'test')")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="billing_audit_log is append-only"):
        await db.execute(statement)
    assert await db.fetchval("SELECT count(*) FROM billing_audit_log") == 1


async def test_service_role_can_read_and_append_snapshots_and_audit(
    db: asyncpg.Connection, tenancy: Tenancy
) -> None:
    assert await as_role(db, SERVICE_ROLE, "SELECT * FROM invoice_snapshot") == "SELECT 2"
    await as_role(
        db,
        SERVICE_ROLE,
        f"INSERT INTO invoice_snapshot ({SNAPSHOT_COLUMNS})"
        " VALUES ($1, '2020-01', 5, 0, 'h', 'sha', 'freezer')",
        tenancy.site_a,
    )
    await as_role(
        db, SERVICE_ROLE, "INSERT INTO billing_audit_log (action, actor) VALUES ('freeze', 'freezer')"
    )
    assert await as_role(db, SERVICE_ROLE, "SELECT * FROM billing_audit_log") == "SELECT 1"
    assert await db.fetchval("SELECT count(*) FROM invoice_snapshot") == 3


# --- the service role: DML on operational tables, no DDL ---------------------------------------------


async def test_service_role_has_no_ddl(db: asyncpg.Connection) -> None:
    ddl = [
        "CREATE TABLE service_made (id int)",
        "CREATE TABLE public.service_made (id int)",
        "CREATE SCHEMA service_schema",
        "ALTER TABLE sites ADD COLUMN extra text",
        "DROP TABLE site_members",
        "CREATE INDEX ON sites (name)",
        "ALTER TABLE invoice_snapshot DISABLE TRIGGER invoice_snapshot_no_update",
        "CREATE FUNCTION service_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "TRUNCATE ingest_idempotency",
    ]
    assert await not_refused(db, SERVICE_ROLE, ddl) == []
    assert await db.fetchval("SELECT to_regclass('service_made')") is None
    assert await db.fetchval("SELECT to_regclass('site_members')::text") == "site_members"


async def test_service_role_writes_operational_tables_and_sees_every_site(
    db: asyncpg.Connection, tenancy: Tenancy
) -> None:
    await as_role(db, SERVICE_ROLE, "INSERT INTO sites (public_id) VALUES ('site-c')")
    await as_role(
        db, SERVICE_ROLE, "UPDATE site_plans SET monthly_limit = 7 WHERE site_id = $1", tenancy.site_a
    )
    await as_role(
        db,
        SERVICE_ROLE,
        "UPDATE ingest_idempotency SET billable = false, billing_state = 'OVERAGE' WHERE site_id = $1",
        tenancy.site_b,
    )
    await as_role(
        db, SERVICE_ROLE, "DELETE FROM billing_reconciliation_jobs WHERE site_id = $1", tenancy.site_a
    )
    assert await as_role(db, SERVICE_ROLE, "SELECT * FROM ingest_idempotency") == "SELECT 2"
    # Partition maintenance is available to the fleet through the definer function.
    assert (
        await as_role(db, SERVICE_ROLE, "SELECT ingest_idempotency_ensure_partitions('2031-01-01', 1)")
        == "SELECT 1"
    )
    assert (
        await db.fetchval("SELECT to_regclass('ingest_idempotency_p2031_01')::text")
        == "ingest_idempotency_p2031_01"
    )
    assert await db.fetchval("SELECT monthly_limit FROM site_plans WHERE site_id = $1", tenancy.site_a) == 7
    assert (
        await db.fetchval(
            "SELECT billing_state::text FROM ingest_idempotency WHERE site_id = $1", tenancy.site_b
        )
        == "OVERAGE"
    )


# --- tenants: read their own sites' rows only, never write ---------------------------------------------


async def visible_sites(db: asyncpg.Connection, user_id: str) -> dict[str, set[uuid.UUID]]:
    seen: dict[str, set[uuid.UUID]] = {}
    async with tenant_transaction(db, user_id):
        assert await db.fetchval("SELECT current_user") == TENANT_ROLE
        for table, column in TENANT_TABLES.items():
            seen[table] = {r[0] for r in await db.fetch(f"SELECT {column} FROM {table}")}
    return seen


async def test_member_sees_only_its_sites_rows(db: asyncpg.Connection, tenancy: Tenancy) -> None:
    assert await visible_sites(db, "alice") == {t: {tenancy.site_a} for t in TENANT_TABLES}
    assert await visible_sites(db, "bob") == {t: {tenancy.site_b} for t in TENANT_TABLES}
    # The role ends with the transaction.
    assert await db.fetchval("SELECT current_user") == "postgres"


async def test_platform_admin_sees_every_site(db: asyncpg.Connection, tenancy: Tenancy) -> None:
    both = {tenancy.site_a, tenancy.site_b}
    assert await visible_sites(db, "root") == {t: both for t in TENANT_TABLES}


@pytest.mark.parametrize("user_id", ["nobody", ""])
async def test_user_without_membership_sees_nothing(
    db: asyncpg.Connection, tenancy: Tenancy, user_id: str
) -> None:
    assert await visible_sites(db, user_id) == {t: set() for t in TENANT_TABLES}


async def test_tenant_cannot_read_membership_tables(db: asyncpg.Connection, tenancy: Tenancy) -> None:
    for table in ("site_members", "platform_admins", "ingest_fallback_buffer", "billing_audit_log"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with tenant_transaction(db, "alice"):
                await db.fetch(f"SELECT * FROM {table}")


TENANT_WRITES = [
    "UPDATE ingest_idempotency SET billable = false",
    "UPDATE ingest_idempotency SET billing_state = 'OVERAGE'",
    "INSERT INTO ingest_idempotency (site_id, idempotency_key, bucket_at)"
    " SELECT id, 'forged', now() FROM sites",
    "DELETE FROM ingest_idempotency",
    "UPDATE site_usage_monthly SET event_count = 0",
    "UPDATE site_plans SET monthly_limit = 1000000",
    f"INSERT INTO invoice_snapshot ({SNAPSHOT_COLUMNS})"
    " SELECT id, '2020-01', 0, 0, 'h', 's', 'tenant' FROM sites",
    # SPEC §1.8: snapshots refuse UPDATE, DELETE and TRUNCATE for every role, the tenant's included.
    "UPDATE invoice_snapshot SET event_count = 0",
    "DELETE FROM invoice_snapshot",
    "TRUNCATE invoice_snapshot",
    "TRUNCATE ingest_idempotency",
    "DELETE FROM billing_audit_log",
    "UPDATE billing_reconciliation_jobs SET status = 'COMPLETED'",
    "INSERT INTO site_members (site_id, user_id, role) SELECT id, 'alice', 'owner' FROM sites",
    "INSERT INTO platform_admins (user_id) VALUES ('alice')",
]


@pytest.mark.parametrize("user_id", ["alice", "root"])
async def test_tenant_writes_are_refused(db: asyncpg.Connection, tenancy: Tenancy, user_id: str) -> None:
    before = [tuple(r) for r in await db.fetch("SELECT * FROM ingest_idempotency ORDER BY id")]
    # Refused by privileges alone: these attempts run in read-write transactions.
    assert await not_refused(db, TENANT_ROLE, TENANT_WRITES, user_id=user_id) == []
    # tenant_transaction is also read-only, a second lock on the same door.
    for statement in TENANT_WRITES:
        with pytest.raises(asyncpg.PostgresError):
            async with tenant_transaction(db, user_id):
                await db.execute(statement)
    assert [tuple(r) for r in await db.fetch("SELECT * FROM ingest_idempotency ORDER BY id")] == before
    assert await db.fetchval("SELECT count(*) FROM site_members") == 2


async def test_tenant_cannot_bypass_rls_through_a_partition(
    db: asyncpg.Connection, tenancy: Tenancy
) -> None:
    await db.execute("SELECT ingest_idempotency_ensure_partitions('2031-01-01', 1)")
    partitions = [
        r[0]
        for r in await db.fetch(
            "SELECT inhrelid::regclass::text FROM pg_inherits"
            " WHERE inhparent = 'ingest_idempotency'::regclass"
        )
    ]
    current = "ingest_idempotency_p" + tenancy.month.replace("-", "_")
    assert {current, "ingest_idempotency_default", "ingest_idempotency_p2031_01"} <= set(partitions)
    for partition in partitions:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with tenant_transaction(db, "alice"):
                await db.fetch(f"SELECT * FROM {partition}")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_role(
            db, TENANT_ROLE, "SELECT ingest_idempotency_ensure_partitions('2032-01-01', 1)", user_id="root"
        )
