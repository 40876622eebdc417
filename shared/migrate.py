"""Migration runner behind `revkernel migrate`: ordered SQL files, checksums, one runner at a time."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

from shared.db import redact_dsn
from shared.logging import get_logger

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant works; it only has to be the same for every runner of this project.
MIGRATION_LOCK_KEY = 0x5245564B  # "REVK"

log = get_logger("migrate")


class MigrationError(RuntimeError):
    """The schema cannot be brought to the files' state (edited file, bad name, failed SQL)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's UTF-8 text: the same on every machine, whatever its locale."""
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files in version order; a malformed or duplicate version is an error."""
    found: dict[str, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise MigrationError(f"migration file name must look like 0001_name.sql: {path.name}")
        version = match.group(1)
        if version in found:
            raise MigrationError(
                f"two migrations share version {version}: {found[version].name}, {path.name}"
            )
        found[version] = Migration(version, path.name, path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def _database_name(dsn: str) -> str:
    name = unquote(urlsplit(dsn).path.lstrip("/"))
    if not name:
        raise MigrationError(f"DATABASE_URL names no database: {redact_dsn(dsn)}")
    return name


def _maintenance_dsn(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def _database_exists(dsn: str) -> bool:
    """Whether the database of `dsn` accepts a connection (needs no access to any other database)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        return False
    await conn.close()
    return True


async def _connect_maintenance(dsn: str) -> asyncpg.Connection:
    """A connection to the cluster's `postgres` database, else `template1` (the same server and user)."""
    try:
        return await asyncpg.connect(_maintenance_dsn(dsn, "postgres"), timeout=10)
    except asyncpg.InvalidCatalogNameError:
        return await asyncpg.connect(_maintenance_dsn(dsn, "template1"), timeout=10)


async def create_database_if_missing(dsn: str) -> bool:
    """Create the database named by `dsn` when it does not exist; True when this call created it.

    Concurrent callers are serialised by an advisory lock in the maintenance database, so exactly one
    creates it and the others find it.
    """
    name = _database_name(dsn)
    if await _database_exists(dsn):
        return False
    conn = await _connect_maintenance(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock(hashtextextended('revkernel:create_database:' || $1, 0))",
                           name)
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        try:
            await conn.execute(f"CREATE DATABASE {quoted}")
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            # A runner of older code, which does not take the lock, created it first.
            log.info("database_created_concurrently", database=name)
            return False
        log.info("database_created", database=name)
        return True
    finally:
        # Closing the session releases its advisory lock.
        await conn.close()


async def apply_migrations(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns the applied file names.

    Holds a session advisory lock so concurrent runners apply each file once, and refuses to run when a
    file that was already applied has since been edited.
    """
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        # Session lock, released when the connection closes (also when this runner dies).
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version text PRIMARY KEY,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {r["version"]: r for r in await conn.fetch("SELECT * FROM schema_migrations")}
        for m in migrations:
            row = applied.get(m.version)
            if row is not None and row["checksum"] != m.checksum:
                raise MigrationError(
                    f"migration {m.name} was edited after it was applied "
                    f"(recorded checksum {row['checksum'][:12]}, file {m.checksum[:12]}); "
                    "add a new migration instead"
                )
        unknown = sorted(set(applied) - {m.version for m in migrations})
        if unknown:
            raise MigrationError(f"database has migrations this code does not know: {unknown}")
        done: list[str] = []
        for m in migrations:
            if m.version in applied:
                continue
            async with conn.transaction():
                try:
                    await conn.execute(m.sql)
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"{m.name} failed: {exc}") from exc
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version, m.name, m.checksum,
                )
            log.info("migration_applied", migration=m.name)
            done.append(m.name)
        await conn.execute("SELECT ingest_idempotency_ensure_partitions()")
        await revoke_public_temporary(conn)
        return done
    finally:
        await conn.close()


# SPEC §7 (no DDL for the fleet or the tenants): a new database grants TEMPORARY to PUBLIC. Revoked on
# every run, because a database's own privileges are not copied by CREATE DATABASE ... TEMPLATE nor
# restored by a plain pg_dump. Only the database's owner (or a superuser) may; anyone else is warned.
async def revoke_public_temporary(conn: asyncpg.Connection) -> None:
    """No temporary tables or functions for PUBLIC on this database (its owner keeps the right)."""
    database = await conn.fetchval("SELECT current_database()")
    owns = await conn.fetchval(
        "SELECT pg_has_role(current_user, datdba, 'MEMBER') FROM pg_database WHERE datname = $1", database
    )
    statement = f'REVOKE TEMPORARY ON DATABASE "{database.replace(chr(34), chr(34) * 2)}" FROM PUBLIC'
    if owns:
        await conn.execute(statement)
    else:
        log.warning("migrate_cannot_revoke_temporary", database=database, run_as_owner=statement)


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """`revkernel migrate`: create the database if missing, then apply what is pending."""
    await create_database_if_missing(dsn)
    return await apply_migrations(dsn, directory)
