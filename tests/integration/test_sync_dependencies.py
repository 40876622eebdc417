"""SPEC §3 and §14 through the real gateway while a dependency misbehaves: a broker that never confirms,
Redis gone, and a gateway started while the broker or Postgres is not there yet."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.app import build_app
from shared.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.integration.conftest import MakeSite
from tests.support.gateway import (
    drain_queue,
    early_in_a_key_bucket,
    gateway_client,
    gateway_via_broker_proxy,
    wait_for_amqp,
)
from tests.support.gateway import (
    post_sync as post,
)
from tests.support.gateway import (
    sync_event as event,
)
from tests.support.proxy import TcpProxy

Client = TestClient[Any, Any]


async def wait_until_ready(client: Client, check: str, timeout_s: float = 30) -> None:
    """Until the gateway's `/readyz` reports `check` reachable again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = await (await client.get("/readyz")).json()
        if body["checks"][check]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway never reported {check} ready")


async def test_a_broker_that_never_confirms_degrades_after_the_publish_timeout(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, redis_client: Any
) -> None:
    """Gate 6's bounded wait: the connection stays open and silent (no error to react to), so only
    `PUBLISH_TIMEOUT_MS` ends the wait; the event is then buffered, billed and counted (SPEC §5)."""
    site = await make_site(monthly_limit=10)
    async with gateway_via_broker_proxy(settings.with_overrides(publish_timeout_ms=300)) as (client, broker):
        broker.swallow()
        started = time.monotonic()
        status, body, headers = await post(client, event())
        waited = time.monotonic() - started

    assert status == 200 and body["status"] == "degraded", body
    assert waited >= 0.3  # it did wait for the confirm, as long as the setting says
    assert headers["x-opsmantik-degraded"] == "broker_publish_failed"
    assert headers["x-opsmantik-quota-remaining"] == "9"
    [row] = await db.fetch("SELECT * FROM ingest_idempotency")
    assert row["billing_state"] == "DEGRADED_CAPTURE" and row["billable"] is True
    [buffered] = await db.fetch("SELECT * FROM ingest_fallback_buffer")
    assert buffered["status"] == "PENDING" and buffered["payload"]["ingest_id"] == body["ingest_id"]
    month = datetime.now(UTC).strftime("%Y-%m")
    assert await redis_client.get(f"usage:{site.id}:{month}") == "1"
    assert await drain_queue(amqp_url) == []  # swallowed: nothing reached the broker


async def test_with_redis_down_the_rate_limit_holds_in_process(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """SPEC §14: Redis unreachable → a local rate limiter, never a closed gate and never no limit."""
    await make_site(monthly_limit=100, rate_limit_per_minute=2)
    redis = RedisServer().start()
    try:
        async with gateway_client(settings.with_overrides(redis_url=redis.url())) as client:
            await wait_for_amqp(client)
            redis.stop()
            answers = [await post(client, event()) for _ in range(3)]
    finally:
        redis.stop()
    assert [a[0] for a in answers] == [200, 200, 429], [a[1] for a in answers]
    assert [a[1].get("status") for a in answers[:2]] == ["queued", "queued"]
    _, refused, headers = answers[2]
    assert refused["error"] == "rate_limited" and headers["x-opsmantik-ratelimit"] == "1"
    assert 0 < int(headers["Retry-After"]) <= 60
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency") == 2
    assert len(await drain_queue(amqp_url)) == 2


async def test_a_gateway_started_before_the_broker_degrades_then_queues(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """SPEC §3: the gateway starts while RabbitMQ is unreachable, captures into the buffer, and publishes
    again once the broker is there (the port opens only after the gateway started)."""
    await make_site(monthly_limit=10)
    proxy = TcpProxy("127.0.0.1", 5672)
    proxy.port = free_port()
    vhost = amqp_url.rsplit("/", 1)[1]
    late_broker = settings.with_overrides(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}")
    try:
        async with gateway_client(late_broker) as client:
            before = await post(client, event())
            await proxy.start()
            await wait_for_amqp(client, timeout_s=60)
            after = await post(client, event())
    finally:
        await proxy.close()
    assert (before[0], before[1]["status"]) == (200, "degraded")
    assert (after[0], after[1]["status"]) == (200, "queued")
    states = await db.fetch("SELECT billing_state FROM ingest_idempotency ORDER BY created_at")
    assert [r["billing_state"] for r in states] == ["DEGRADED_CAPTURE", "ACCEPTED"]
    [published] = await drain_queue(amqp_url)
    assert published.message_id == after[1]["ingest_id"]


async def test_a_gateway_started_before_postgres_refuses_then_captures(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """SPEC §3/§14: started while Postgres is unreachable, the gateway answers 500 billing_gate_closed
    (nothing billed, nothing published) and captures once Postgres is reachable."""
    await make_site(monthly_limit=10)
    proxy = TcpProxy("127.0.0.1", 5432)
    proxy.port = free_port()
    database = settings.database_url.rsplit("/", 1)[1]
    late_postgres = settings.with_overrides(
        database_url=f"postgresql://postgres@127.0.0.1:{proxy.port}/{database}"
    )
    sent = event()
    try:
        async with gateway_client(late_postgres) as client:
            await wait_for_amqp(client)
            closed = await post(client, sent)
            await proxy.start()
            await wait_until_ready(client, "postgres", timeout_s=60)
            opened = await post(client, sent)
    finally:
        await proxy.close()
    assert closed[0] == 500 and closed[1]["error"] == "billing_gate_closed", closed[1]
    assert (opened[0], opened[1]["status"]) == (200, "queued")  # the retry is a new event, not a duplicate
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency") == 1
    assert len(await drain_queue(amqp_url)) == 1


async def test_redis_back_after_start_counts_again(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """A gateway started while Redis is down decides quota in Postgres, then re-seeds the counter
    exactly once Redis is reachable (SPEC §14's recovery column)."""
    site = await make_site(monthly_limit=1000)
    redis = RedisServer()
    try:
        async with gateway_client(settings.with_overrides(redis_url=redis.url())) as client:
            await wait_for_amqp(client)
            without = await post(client, event())
            redis.start()
            await wait_until_ready(client, "redis", timeout_s=60)
            deadline = time.monotonic() + 30
            answers = []
            while time.monotonic() < deadline:  # until the pipeline retries Redis (its retry interval)
                answers.append(await post(client, event()))
                if answers[-1][0] != 200 or "x-opsmantik-degraded" not in answers[-1][2]:
                    break
                await asyncio.sleep(0.05)
            counter = aioredis.Redis.from_url(redis.url(), decode_responses=True)
            month = datetime.now(UTC).strftime("%Y-%m")
            try:
                seeded = await counter.get(f"usage:{site.id}:{month}")
            finally:
                await counter.aclose()
    finally:
        redis.stop()
    assert without[2]["x-opsmantik-degraded"] == "quota_pg_conservative"
    assert [a[1]["status"] for a in answers] == ["queued"] * len(answers)
    assert "x-opsmantik-degraded" not in answers[-1][2]  # the last one was counted in Redis again
    accepted = 1 + len(answers)
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency WHERE billable") == accepted
    assert seeded is not None and int(seeded) == accepted  # the counter holds Postgres's exact count


async def test_a_commit_whose_reply_is_lost_answers_what_postgres_decided(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, redis_client: Any
) -> None:
    """The connection breaks after COMMIT reached Postgres: the events are billed, so the answer is
    theirs (`queued`), and the quota counter keeps them. Before, the answer was 500 (a retry after the
    5 s key bucket billed the event again) and the reservation was given back, so a hard plan of 3
    took 4 events (found by a chaos soak)."""
    site = await make_site(monthly_limit=3)
    proxy, client = await _gateway_via_postgres_proxy(settings)
    try:
        first = await post(client, event())
        await early_in_a_key_bucket()  # the retry below shares the lost event's key
        proxy.lose_reply_to(b"COMMIT;")  # what asyncpg sends to end a transaction
        lost = event()
        answered = await post(client, lost)
        retried = await post(client, lost)
        later = [await post(client, event()) for _ in range(2)]
    finally:
        await client.close()
        await proxy.close()
    assert proxy.replies_lost == 1
    assert first[1]["status"] == "queued"
    assert (answered[0], answered[1]["status"]) == (200, "queued"), answered[1]
    assert retried[1]["status"] == "duplicate"
    assert [(a[0], a[1]["status"]) for a in later] == [(200, "queued"), (429, "rejected_quota")]
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency WHERE billable") == 3
    month = datetime.now(UTC).strftime("%Y-%m")
    assert await redis_client.get(f"usage:{site.id}:{month}") == "3"
    assert len(await drain_queue(amqp_url)) == 3


async def test_a_commit_that_never_reached_postgres_bills_nothing(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, redis_client: Any
) -> None:
    """The other side of the same check: COMMIT lost on the way, the transaction aborted, so 500
    billing_gate_closed, no row, and the reservation given back (the retry is a new event)."""
    site = await make_site(monthly_limit=3)
    proxy, client = await _gateway_via_postgres_proxy(settings)
    try:
        await post(client, event())
        proxy.lose_reply_to(b"COMMIT;", forward=False)
        lost = event()
        refused = await post(client, lost)
        retried = await post(client, lost)
    finally:
        await client.close()
        await proxy.close()
    assert proxy.replies_lost == 1
    assert (refused[0], refused[1]["error"]) == (500, "billing_gate_closed")
    assert (retried[0], retried[1]["status"]) == (200, "queued")
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency WHERE billable") == 2
    month = datetime.now(UTC).strftime("%Y-%m")
    assert await redis_client.get(f"usage:{site.id}:{month}") == "2"


async def test_a_commit_whose_fate_cannot_be_learned_keeps_its_reservation(
    settings: Settings,
    db: asyncpg.Connection,
    make_site: MakeSite,
    amqp_url: str,
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """COMMIT's reply lost and Postgres unreachable while the gateway asks: 500 (it cannot say), but the
    reservation stays, so the counter errs high (re-seeded at the limit), never low (a hard plan's
    overshoot). Postgres back, the client's retry in the same bucket is a duplicate: billed once."""
    monkeypatch.setattr("shared.ingest.COMMIT_OUTCOME_WAIT_S", 0.5)
    site = await make_site(monthly_limit=3)
    proxy, client = await _gateway_via_postgres_proxy(settings)
    try:
        await post(client, event())
        await early_in_a_key_bucket(margin_s=3.0)  # 0.5 s of asking, then the retry, in one bucket
        proxy.lose_reply_to(b"COMMIT;", then_refuse=True)
        lost = event()
        refused = await post(client, lost)
        proxy.restore()
        retried = await post(client, lost)
    finally:
        await client.close()
        await proxy.close()
    assert (refused[0], refused[1]["error"]) == (500, "billing_gate_closed")
    assert retried[1]["status"] == "duplicate"
    assert await db.fetchval("SELECT count(*) FROM ingest_idempotency WHERE billable") == 2
    month = datetime.now(UTC).strftime("%Y-%m")
    assert await redis_client.get(f"usage:{site.id}:{month}") == "2"


async def _gateway_via_postgres_proxy(settings: Settings) -> tuple[TcpProxy, Client]:
    """A gateway whose Postgres connections pass a TcpProxy; connected to the broker when returned."""
    proxy = await TcpProxy("127.0.0.1", 5432).start()
    database = settings.database_url.rsplit("/", 1)[1]
    proxied = settings.with_overrides(database_url=f"postgresql://postgres@127.0.0.1:{proxy.port}/{database}")
    client: Client = TestClient(TestServer(build_app(proxied)))
    await client.start_server()
    await wait_for_amqp(client)
    return proxy, client
