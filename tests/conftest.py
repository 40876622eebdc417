"""Shared test infrastructure: a migrated template database cloned per test, a private RabbitMQ vhost
per session (queues purged per test), a Redis database per test, and settings pointing at them."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest
import redis.asyncio as aioredis

from shared.amqp import DEAD_LETTER_QUEUE, FREEZER_QUEUE, INGEST_QUEUE, RECONCILER_QUEUE, declare_topology
from shared.db import connect
from shared.migrate import apply_migrations, create_database_if_missing, revoke_public_temporary
from shared.settings import LOGIN_ROLE, Settings

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_ADMIN_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
REDIS_HOST = "127.0.0.1"
AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
CRON_SECRET = "test-cron-secret-0123456789"
JWT_SECRET = "test-jwt-secret-that-is-long-enough-0123456789"
REPO_ROOT = Path(__file__).resolve().parent.parent

_RUN = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
TEMPLATE_DB = f"rk_tpl_{_RUN}"
_db_counter = itertools.count(1)
_redis_db = itertools.cycle(range(1, 16))


def pg_dsn(database: str, host: str = PG_HOST, port: int = PG_PORT) -> str:
    return f"postgresql://postgres@{host}:{port}/{database}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/unit are `unit`, the rest `integration`, unless marked otherwise."""
    for item in items:
        if item.get_closest_marker("unit") or item.get_closest_marker("integration"):
            continue
        kind = "unit" if "/tests/unit/" in str(item.fspath) else "integration"
        item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
async def template_database() -> AsyncIterator[str]:
    """Migrated once per session; every test database is a cheap clone of it."""
    dsn = pg_dsn(TEMPLATE_DB)
    await create_database_if_missing(dsn)
    await apply_migrations(dsn)
    yield TEMPLATE_DB
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test (a clone of the template), dropped afterwards."""
    name = f"rk_t_{_RUN}_{next(_db_counter)}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    finally:
        await admin.close()
    # A clone does not inherit the template's database privileges: as `revkernel migrate` does on
    # every run, take TEMPORARY from PUBLIC.
    clone = await asyncpg.connect(pg_dsn(name))
    try:
        await revoke_public_temporary(clone)
    finally:
        await clone.close()
    yield pg_dsn(name)
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to this test's database (for arranging and asserting rows)."""
    conn = await connect(database_url)
    yield conn
    await conn.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """A private vhost, so tests never consume a running fleet's messages; deleted at the end."""
    vhost = f"rk-test-{_RUN}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield vhost
    _rabbitmqctl("delete_vhost", vhost)


def amqp_url_for(vhost: str, host: str = AMQP_HOST, port: int = AMQP_PORT) -> str:
    return f"amqp://guest:guest@{host}:{port}/{vhost}"


@pytest.fixture
async def amqp_url(amqp_vhost: str) -> AsyncIterator[str]:
    """The session vhost with the contract topology declared and every queue empty."""
    url = amqp_url_for(amqp_vhost)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel)
        for name in (INGEST_QUEUE, RECONCILER_QUEUE, FREEZER_QUEUE, DEAD_LETTER_QUEUE):
            queue = await channel.get_queue(name)
            await queue.purge()
    yield url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server on its own port: concurrent test runs never share keys, and a test may
    stop and restart it to cause a real Redis outage."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--databases", "16"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def url(self, db: int = 0) -> str:
        return f"redis://{REDIS_HOST}:{self.port}/{db}"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> AsyncIterator[str]:
    """A Redis database of its own (1-15 of the session's private server, flushed)."""
    url = redis_server.url(next(_redis_db))
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    yield url
    await client.flushdb()
    await client.aclose()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def settings(database_url: str, redis_url: str, amqp_url: str) -> Settings:
    """Settings for a fleet process of this test: its own database, Redis db and vhost."""
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        amqp_url=amqp_url,
        cron_secret=CRON_SECRET,
        auth_jwt_secret=JWT_SECRET,
        commit_sha="testsha",
        git_branch="testbranch",
        command_timeout_s=10.0,
        publish_timeout_ms=5000,  # a slow CI machine is no broker fault; tests of the timeout set theirs
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a `revkernel` subprocess use these settings, and only these: SPEC §12
    variables (and their `_FILE` forms) set in the shell running the tests are left out."""
    configured = {f.upper() for f in Settings.__dataclass_fields__}
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in configured and name.removesuffix("_FILE") not in configured
    }
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        AMQP_URL=settings.amqp_url,
        CRON_SECRET=settings.cron_secret or "",
        AUTH_JWT_SECRET=settings.auth_jwt_secret or "",
        COMMIT_SHA=settings.commit_sha or "",
        GIT_BRANCH=settings.git_branch or "",
        COMMAND_TIMEOUT_S=str(settings.command_timeout_s),
        PUBLISH_TIMEOUT_MS=str(settings.publish_timeout_ms),
        IDEMPOTENCY_VERSION=str(settings.idempotency_version),
        RATE_LIMIT_PER_MINUTE=str(settings.rate_limit_per_minute),
        DEFAULT_MONTHLY_LIMIT=str(settings.default_monthly_limit),
        SITE_CACHE_TTL_S=str(settings.site_cache_ttl_s),
        LOG_LEVEL=settings.log_level,
        TRUSTED_PROXIES=",".join(str(network) for network in settings.trusted_proxies),
        DATABASE_ROLE=settings.database_role or LOGIN_ROLE,
        AUTH_JWT_AUDIENCE=settings.auth_jwt_audience or "",
        AUTH_JWT_ISSUER=settings.auth_jwt_issuer or "",
    )
    return env
