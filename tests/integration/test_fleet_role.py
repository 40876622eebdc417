"""The fleet works with `revkernel_service`'s rights whoever logs in (SPEC §7): DML, no DDL, no UPDATE or
DELETE of snapshots, and no way to switch the snapshots' triggers off. The tests log in as the cluster's
superuser, as `make run` does, so any right beyond the role's would show here."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from services.gateway.context import CONTEXT
from services.gateway.sync import SYNC_GATE
from shared.amqp import RECONCILER_QUEUE
from shared.db import SERVICE_ROLE, close_pool
from shared.settings import Settings
from shared.worker import Worker

# What the owner (or a superuser) may do and the service role may not.
OWNER_ONLY = [
    "ALTER TABLE invoice_snapshot DISABLE TRIGGER ALL",
    "CREATE TABLE fleet_scratch (id int)",
    "UPDATE invoice_snapshot SET event_count = event_count",
    "DROP TABLE ingest_idempotency_default",
    "CREATE TEMP TABLE fleet_scratch (id int)",  # PUBLIC held TEMPORARY (migration 0026)
]


async def assert_service_rights(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_user") == SERVICE_ROLE
        assert await conn.fetchval("SELECT session_user") != SERVICE_ROLE  # logged in as someone else
        for statement in OWNER_ONLY:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.execute(statement)


async def test_the_gateway_s_pools_run_as_the_service_role(gateway: TestClient[Any, Any]) -> None:
    await assert_service_rights(gateway.app[CONTEXT].pool)
    capture_pool = gateway.app[SYNC_GATE].pipeline._pool  # noqa: SLF001 - the wiring under test
    await assert_service_rights(capture_pool)


async def test_a_worker_s_pool_runs_as_the_service_role(settings: Settings) -> None:
    worker = Worker(name="reconciler", settings=settings, command_queue=RECONCILER_QUEUE, http_port=0)
    await worker.open_clients()
    try:
        await assert_service_rights(worker.pool)
        async with worker.pool.acquire() as conn:  # released and reset once: still the service role
            assert await conn.fetchval("SELECT current_user") == SERVICE_ROLE
    finally:
        await close_pool(worker.pool)
        await worker.redis.aclose()


async def test_database_role_login_keeps_the_login_user(settings: Settings) -> None:
    """Behind a transaction-mode pooler a session's SET ROLE would outlive its client, so the fleet
    can be told to work as its login user (which must then hold only the service role's rights)."""
    worker = Worker(
        name="reconciler", settings=settings.with_overrides(database_role=None),
        command_queue=RECONCILER_QUEUE, http_port=0,
    )  # fmt: skip
    await worker.open_clients()
    try:
        assert await worker.pool.fetchval("SELECT current_user") == await worker.pool.fetchval(
            "SELECT session_user"
        )
    finally:
        await close_pool(worker.pool)
        await worker.redis.aclose()
