"""asyncpg pool factory and the tenant-scoped transaction (SPEC §7 roles and RLS)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

SERVICE_ROLE = "revkernel_service"
TENANT_ROLE = "revkernel_tenant"


def redact_dsn(dsn: str) -> str:
    """The DSN without its password (in the user part or a `password=` parameter), for messages and logs."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = "&".join(
        "password=***" if item.split("=", 1)[0] == "password" else item
        for item in parts.query.split("&")
    ) if parts.query else parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


async def _init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
        )


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    session_settings: Mapping[str, str] | None = None,
    role: str | None = None,
    **kwargs: Any,
) -> asyncpg.Pool:
    """A pool whose connections decode json/jsonb with orjson and time out instead of hanging.

    `session_settings` are set on each new connection with `set_config` (not as startup parameters,
    which PgBouncer refuses); keep them for pools whose `reset` keeps session state.
    `role`: each connection runs as that role (`SET ROLE`, which the pool's `RESET ALL` keeps), so the
    fleet works with `revkernel_service`'s rights whoever logs in (SPEC §7); the login user must be a
    member of it.
    """
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("command_timeout", 30.0)
    settings = dict(session_settings or {})
    if settings and "reset" not in kwargs:
        raise ValueError("session_settings need a pool reset that keeps session state (RESET ALL drops them)")

    async def init(conn: asyncpg.Connection) -> None:
        await _init_connection(conn)
        if role is not None:
            await conn.execute("SELECT set_config('role', $1, false)", role)
        for name, value in settings.items():
            await conn.execute("SELECT set_config($1, $2, false)", name, value)

    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=init, **kwargs)
    assert pool is not None
    return pool


async def keep_session_state(conn: asyncpg.Connection) -> None:
    """A pool `reset` that saves the reset round trip on every release.

    For pools whose users only ever run transactions (advisory locks, SET LOCAL and set_config(...,
    true) all end with the transaction); a connection released inside a transaction is closed.
    """
    if conn.is_in_transaction():
        conn.terminate()


async def close_pool(pool: asyncpg.Pool, timeout_s: float = 5.0) -> None:
    """Close gracefully, or terminate the connections when Postgres does not answer in time."""
    try:
        await asyncio.wait_for(pool.close(), timeout=timeout_s)
    except (TimeoutError, asyncpg.PostgresError, OSError):
        pool.terminate()


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """One connection with the same codecs as the pool."""
    kwargs.setdefault("timeout", 5.0)
    conn = await asyncpg.connect(dsn, **kwargs)
    await _init_connection(conn)
    return conn


@contextlib.asynccontextmanager
async def tenant_transaction(
    conn: asyncpg.Connection, user_id: str, *, isolation: str = "repeatable_read"
) -> AsyncIterator[asyncpg.Connection]:
    """A read-only transaction running as the tenant role, with RLS keyed on `app.user_id`."""
    async with conn.transaction(isolation=isolation, readonly=True):
        await conn.execute(f"SET LOCAL ROLE {TENANT_ROLE}")
        await conn.execute("SELECT set_config('app.user_id', $1, true)", user_id)
        yield conn
