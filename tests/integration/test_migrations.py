"""The migration runner (`revkernel migrate`, SPEC §13): idempotent, checksum-guarded, one runner at a time,
and it creates a missing database."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

from shared.migrate import (
    MIGRATIONS_DIR,
    MigrationError,
    apply_migrations,
    load_migrations,
    migrate,
    revoke_public_temporary,
)
from tests.conftest import PG_ADMIN_DSN, pg_dsn

ALL_FILES = [m.name for m in load_migrations()]


@pytest.fixture
async def new_database_url() -> AsyncIterator[str]:
    """The URL of a database that does not exist yet; dropped afterwards if a test created it."""
    name = f"rk_new_{uuid.uuid4().hex[:12]}"
    yield pg_dsn(name)
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A private copy of the project's migrations that a test may extend or edit."""
    target = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, target)
    return target


async def recorded_versions(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [
            r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        ]
    finally:
        await conn.close()


async def database_exists(name: str) -> bool:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        return bool(await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await admin.close()


async def test_migrate_creates_an_unknown_database_and_a_second_run_applies_nothing(
    new_database_url: str,
) -> None:
    name = new_database_url.rsplit("/", 1)[1]
    assert not await database_exists(name)

    assert await migrate(new_database_url) == ALL_FILES
    assert await database_exists(name)
    assert await recorded_versions(new_database_url) == [f[:4] for f in ALL_FILES]

    assert await migrate(new_database_url) == []
    assert await recorded_versions(new_database_url) == [f[:4] for f in ALL_FILES]


async def test_two_runners_at_once_apply_each_file_exactly_once(new_database_url: str) -> None:
    # Both also race to create the database: exactly one creates it, neither fails.
    first, second = await asyncio.gather(migrate(new_database_url), migrate(new_database_url))
    assert sorted(first + second) == sorted(ALL_FILES)
    assert [] in (first, second)
    conn = await asyncpg.connect(new_database_url)
    try:
        rows = await conn.fetch("SELECT version, count(*) AS n FROM schema_migrations GROUP BY version")
        assert {r["version"]: r["n"] for r in rows} == {f[:4]: 1 for f in ALL_FILES}
    finally:
        await conn.close()


async def test_two_appliers_on_an_existing_empty_database(new_database_url: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{new_database_url.rsplit("/", 1)[1]}"')
    finally:
        await admin.close()
    results = await asyncio.gather(*(apply_migrations(new_database_url) for _ in range(3)))
    assert sorted(sum(results, [])) == sorted(ALL_FILES)
    assert await recorded_versions(new_database_url) == [f[:4] for f in ALL_FILES]


async def test_a_new_file_is_applied_once(database_url: str, migrations_copy: Path) -> None:
    (migrations_copy / "0999_extra.sql").write_text("CREATE TABLE extra_marker (id int);\n")
    assert await apply_migrations(database_url, migrations_copy) == ["0999_extra.sql"]
    assert await apply_migrations(database_url, migrations_copy) == []
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('extra_marker')::text") == "extra_marker"
    finally:
        await conn.close()


async def test_an_edited_applied_migration_is_refused_and_nothing_else_runs(
    database_url: str, migrations_copy: Path
) -> None:
    edited = migrations_copy / "0002_tenancy_and_billing_tables.sql"
    edited.write_text(edited.read_text() + "\n-- a harmless-looking edit\n")
    (migrations_copy / "0999_extra.sql").write_text("CREATE TABLE extra_marker (id int);\n")

    with pytest.raises(
        MigrationError, match="0002_tenancy_and_billing_tables.sql was edited after it was applied"
    ):
        await apply_migrations(database_url, migrations_copy)

    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('extra_marker')") is None
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version = '0999'") == 0
    finally:
        await conn.close()


async def test_a_failing_migration_is_rolled_back_and_not_recorded(
    database_url: str, migrations_copy: Path
) -> None:
    bad = migrations_copy / "0999_extra.sql"
    bad.write_text("CREATE TABLE extra_marker (id int);\nSELECT * FROM no_such_table;\n")
    with pytest.raises(MigrationError, match="0999_extra.sql failed"):
        await apply_migrations(database_url, migrations_copy)
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('extra_marker')") is None
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version = '0999'") == 0
    finally:
        await conn.close()

    bad.write_text("CREATE TABLE extra_marker (id int);\n")
    assert await apply_migrations(database_url, migrations_copy) == ["0999_extra.sql"]


async def test_a_database_ahead_of_the_code_is_refused(database_url: str, migrations_copy: Path) -> None:
    (migrations_copy / "0999_extra.sql").write_text("SELECT 1;\n")
    await apply_migrations(database_url, migrations_copy)
    with pytest.raises(MigrationError, match=r"migrations this code does not know: \['0999'\]"):
        await apply_migrations(database_url, MIGRATIONS_DIR)


async def test_migrate_takes_temporary_from_public_on_every_run(new_database_url: str) -> None:
    """SPEC §7: the service and tenant roles create nothing, temporary tables included. A new database
    grants TEMPORARY to PUBLIC, and a clone or a restore brings that grant back: every run revokes it."""
    await migrate(new_database_url)
    conn = await asyncpg.connect(new_database_url)
    try:
        for role in ("revkernel_service", "revkernel_tenant"):
            temporary = "SELECT has_database_privilege($1, current_database(), 'TEMP')"
            assert not await conn.fetchval(temporary, role)
        name = new_database_url.rsplit("/", 1)[1]
        await conn.execute(f'GRANT TEMPORARY ON DATABASE "{name}" TO PUBLIC')  # as a restore would
    finally:
        await conn.close()
    assert await migrate(new_database_url) == []
    conn = await asyncpg.connect(new_database_url)
    try:
        assert not await conn.fetchval(
            "SELECT has_database_privilege('revkernel_service', current_database(), 'TEMP')"
        )
    finally:
        await conn.close()


async def test_a_migrating_user_that_does_not_own_the_database_is_told_what_to_run(
    database_url: str, db: asyncpg.Connection
) -> None:
    role = f"rk_not_owner_{uuid.uuid4().hex[:8]}"
    await db.execute(f'CREATE ROLE "{role}" LOGIN')
    name = database_url.rsplit("/", 1)[1]
    await db.execute(f'GRANT TEMPORARY ON DATABASE "{name}" TO PUBLIC')
    try:
        conn = await asyncpg.connect(database_url.replace("postgres@", f"{role}@"))
        try:
            with capture_logs() as logs:
                await revoke_public_temporary(conn)
        finally:
            await conn.close()
        [warning] = [line for line in logs if line["event"] == "migrate_cannot_revoke_temporary"]
        assert warning["log_level"] == "warning" and "REVOKE TEMPORARY" in warning["run_as_owner"]
        assert await db.fetchval("SELECT has_database_privilege('revkernel_service', $1, 'TEMP')", name)
    finally:
        await db.execute(f'DROP ROLE "{role}"')
