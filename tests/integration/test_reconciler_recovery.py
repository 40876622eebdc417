"""Fallback recovery (SPEC §6) against real Postgres and RabbitMQ: broker cut, back, worker killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from services.reconciler.main import Reconciler, ReconcilerConfig
from services.reconciler.recovery import RecoverySettings, recover_batch
from shared.amqp import INGEST_QUEUE
from shared.db import create_pool
from shared.publisher import EventPublisher
from shared.settings import Settings
from tests.conftest import AMQP_HOST, AMQP_PORT, REPO_ROOT, free_port, settings_env
from tests.integration.reconciler_support import create_site, poll
from tests.support.gateway import gateway_via_broker_proxy
from tests.support.proxy import TcpProxy

BUFFER_ROW = """
INSERT INTO ingest_fallback_buffer (site_id, idempotency_key, bucket_at, payload, routing_key, error_reason)
VALUES ($1, $2, $3, $4, $5, 'broker_publish_failed')
"""
IDEMPOTENCY_ROW = """
INSERT INTO ingest_idempotency (site_id, idempotency_key, idempotency_version, bucket_at, created_at,
                                expires_at, billing_state, billable)
VALUES ($1, $2, 1, $3::timestamptz, $3::timestamptz, $3::timestamptz + interval '2160 hours',
        'DEGRADED_CAPTURE', true)
"""


async def buffer_events(
    db: asyncpg.Connection, site_id: uuid.UUID, public_id: str, n: int
) -> list[dict[str, Any]]:
    """N degraded captures as the gateway writes them: one buffer row per enriched event."""
    now = datetime.now(UTC).replace(microsecond=0)
    payloads = []
    for i in range(n):
        bucket = now - timedelta(seconds=5 * i)
        event = {
            "s": public_id,
            "url": f"https://example.test/p/{i}",
            "ea": "page_view",
            "ingest_id": str(uuid.uuid4()),
            "idempotency_key": uuid.uuid4().hex + uuid.uuid4().hex,
            "site_id": str(site_id),
            "received_at": now.isoformat().replace("+00:00", "Z"),
            "ip": "203.0.113.9",
            "ua": "test",
        }
        await db.execute(IDEMPOTENCY_ROW, site_id, event["idempotency_key"], bucket)
        await db.execute(BUFFER_ROW, site_id, event["idempotency_key"], bucket, event, f"event.{public_id}")
        payloads.append(event)
    return payloads


async def take_messages(amqp_url: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(amqp_url)
    out = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(INGEST_QUEUE)
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            await message.ack()
            out.append(message)
    return out


async def queue_depth(amqp_url: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(INGEST_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def statuses(db: asyncpg.Connection) -> dict[str, int]:
    rows = await db.fetch("SELECT status, count(*) AS n FROM ingest_fallback_buffer GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


async def test_buffer_is_republished_exactly_once_when_the_broker_returns(
    db: asyncpg.Connection, settings: Settings
) -> None:
    site = await create_site(db, public_id="rec-site")
    payloads = await buffer_events(db, site, "rec-site", 25)
    proxy = await TcpProxy(AMQP_HOST, AMQP_PORT).start()
    await proxy.cut()
    vhost = settings.amqp_url.rsplit("/", 1)[1]
    through_proxy = settings.with_overrides(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}")
    reconciler = Reconciler(
        through_proxy,
        ReconcilerConfig(
            recovery=RecoverySettings(batch_size=10),
            reconcile_interval_s=3600,
            recovery_interval_s=0.2,
            http_port=0,
        ),
    )
    await reconciler.worker.start()
    try:
        # Broker unreachable: nothing is claimed, so no attempt is burnt.
        assert not await reconciler.recovery_schedule()
        assert await statuses(db) == {"PENDING": 25}
        assert await db.fetchval("SELECT max(attempt_count) FROM ingest_fallback_buffer") == 0

        proxy.restore()
        await poll(lambda: _all_recovered(db, 25))
    finally:
        await reconciler.worker.stop()
        await proxy.close()

    messages = await take_messages(settings.amqp_url)
    assert len(messages) == 25
    bodies = {m.message_id: orjson.loads(m.body) for m in messages}
    assert bodies == {p["ingest_id"]: p for p in payloads}
    assert all(m.routing_key == "event.rec-site" for m in messages)
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in messages)
    rows = await db.fetch("SELECT billing_state, billable FROM ingest_idempotency WHERE site_id = $1", site)
    assert len(rows) == 25 and all(r["billing_state"] == "RECOVERED" and r["billable"] for r in rows)


async def _all_recovered(db: asyncpg.Connection, n: int) -> bool:
    return await statuses(db) == {"RECOVERED": n}


async def test_killed_reconciler_during_recovery_loses_nothing(
    db: asyncpg.Connection, database_url: str, pool: asyncpg.Pool, settings: Settings
) -> None:
    site = await create_site(db, public_id="kill-site")
    payloads = await buffer_events(db, site, "kill-site", 12)
    keys = {p["idempotency_key"] for p in payloads}
    # Hold the idempotency rows: the subprocess publishes its first batch, then blocks marking it.
    blocker = await asyncpg.connect(database_url)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("SELECT 1 FROM ingest_idempotency WHERE site_id = $1 FOR UPDATE", site)
    env = settings_env(settings)
    env["RECONCILER_HTTP_PORT"] = str(free_port())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "reconciler",
            "--recovery-batch",
            "5",
            "--recovery-lease-seconds",
            "1",
            "--recovery-interval",
            "0.2",
            "--reconcile-interval",
            "3600",
        ],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await poll(lambda: _depth_at_least(settings.amqp_url, 5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        await tx.rollback()
        await blocker.close()
    assert (await statuses(db)).get("PROCESSING") == 5  # published, never marked: the crash window

    publisher = EventPublisher(settings.amqp_url, timeout_ms=2000)
    await publisher.start()
    try:
        await poll(lambda: _ready(publisher))

        async def drained() -> bool:
            await recover_batch(pool, publisher, RecoverySettings(batch_size=5, lease_s=1))
            return await _all_recovered(db, 12)

        await poll(drained, interval_s=0.3)
    finally:
        await publisher.close()
    messages = await take_messages(settings.amqp_url)
    seen = [orjson.loads(m.body)["idempotency_key"] for m in messages]
    assert set(seen) == keys  # nothing lost
    assert len(seen) - len(set(seen)) <= 5  # only the crashed batch may repeat; dedupable by key
    states = await db.fetch("SELECT billing_state FROM ingest_idempotency WHERE site_id = $1", site)
    assert {r["billing_state"] for r in states} == {"RECOVERED"}


async def _depth_at_least(amqp_url: str, n: int) -> bool:
    return await queue_depth(amqp_url) >= n


async def _ready(publisher: EventPublisher) -> bool:
    return publisher.is_ready


async def test_unroutable_rows_back_off_then_fail(
    db: asyncpg.Connection, pool: asyncpg.Pool, settings: Settings
) -> None:
    site = await create_site(db, public_id="bad-route")
    await buffer_events(db, site, "bad-route", 2)
    await db.execute("UPDATE ingest_fallback_buffer SET routing_key = 'nowhere.bad-route'")
    publisher = EventPublisher(settings.amqp_url, timeout_ms=2000)
    await publisher.start()
    try:
        await poll(lambda: _ready(publisher))
        config = RecoverySettings(max_attempts=3, retry_base_s=30)
        delays = []
        for attempt in (1, 2):
            result = await recover_batch(pool, publisher, config)
            assert (result.claimed, result.recovered, result.failed) == (2, 0, 2)
            assert await statuses(db) == {"PENDING": 2}
            rows = await db.fetch(
                "SELECT attempt_count, last_error, extract(epoch FROM next_attempt_at - now()) AS wait_s"
                " FROM ingest_fallback_buffer"
            )
            assert all(r["attempt_count"] == attempt and r["last_error"] for r in rows)
            delays.append(min(float(r["wait_s"]) for r in rows))
            again = await recover_batch(pool, publisher, config)
            assert again.claimed == 0  # backing off: not claimed again before next_attempt_at
            await db.execute("UPDATE ingest_fallback_buffer SET next_attempt_at = now()")  # time passes
        assert 25 < delays[0] <= 30 and 55 < delays[1] <= 60  # base, then doubled

        last = await recover_batch(pool, publisher, config)
        assert (last.claimed, last.failed) == (2, 2)
        assert await statuses(db) == {"FAILED": 2}  # attempts used up
        assert (await recover_batch(pool, publisher, config)).claimed == 0
    finally:
        await publisher.close()
    assert await queue_depth(settings.amqp_url) == 0
    states = await db.fetch("SELECT billing_state FROM ingest_idempotency WHERE site_id = $1", site)
    assert {r["billing_state"] for r in states} == {"DEGRADED_CAPTURE"}


async def test_a_degraded_event_with_its_own_events_field_is_republished_as_itself(
    db: asyncpg.Connection, pool: asyncpg.Pool, settings: Settings
) -> None:
    """A buffer row is one event: a client's `events` list inside it is data, never a batch envelope
    (else downstream would read the client's objects, with a forged site and key, as the events)."""
    site = await create_site(db, public_id="nest-site")
    forged = {"site_id": str(uuid.uuid4()), "idempotency_key": "forged-key", "url": "https://evil.test/"}
    sent = {"s": "nest-site", "url": "https://example.test/real", "events": [forged]}
    async with gateway_via_broker_proxy(settings) as (client, broker):
        await broker.cut()
        response = await client.post("/api/sync", data=orjson.dumps({"events": [sent]}))
        answer = await response.json()
    assert answer["results"][0]["status"] == "degraded"

    publisher = EventPublisher(settings.amqp_url, timeout_ms=2000)
    await publisher.start()
    try:
        await poll(lambda: _ready(publisher))
        result = await recover_batch(pool, publisher, RecoverySettings())
    finally:
        await publisher.close()
    assert (result.claimed, result.recovered, result.failed) == (1, 1, 0)

    [message] = await take_messages(settings.amqp_url)
    assert "x-event-count" not in (message.headers or {})
    body = orjson.loads(message.body)
    assert body["events"] == [forged] and body["site_id"] == str(site)
    assert message.message_id == body["ingest_id"] == answer["results"][0]["ingest_id"]
    [row] = await db.fetch("SELECT idempotency_key, billing_state FROM ingest_idempotency")
    assert row["billing_state"] == "RECOVERED" and row["idempotency_key"] == body["idempotency_key"]
