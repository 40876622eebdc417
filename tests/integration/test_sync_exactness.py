"""SPEC §1.7: a hard limit is exact under hundreds of concurrent requests, across processes, and
while Redis goes away mid-run."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import ClientSession, TCPConnector

from shared.settings import Settings
from tests.conftest import RedisServer, free_port, settings_env
from tests.integration.conftest import MakeSite
from tests.support.gateway import GatewayProcesses, drain_queue, gateway_client, wait_for_amqp

EVENTS = 200


def distinct_events(n: int, site: str = "site-a") -> list[bytes]:
    run = uuid.uuid4().hex
    return [
        orjson.dumps({"s": site, "url": f"https://example.com/{run}/{i}", "sid": str(i)}) for i in range(n)
    ]


async def fire(session: Any, url: str, bodies: list[bytes]) -> Counter[str]:
    """POST every body at once; tally the answers' statuses."""

    async def one(body: bytes) -> str:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
            answer = await response.json()
            if response.status >= 500:
                raise AssertionError(f"{response.status}: {answer}")
            return str(answer["status"])

    return Counter(await asyncio.gather(*(one(b) for b in bodies)))


async def billing(db: asyncpg.Connection) -> Counter[str]:
    records = await db.fetch(
        "SELECT billable, billing_state, count(*) AS n FROM ingest_idempotency GROUP BY 1, 2"
    )
    out: Counter[str] = Counter()
    for r in records:
        out[("billable_" if r["billable"] else "unbilled_") + r["billing_state"]] += r["n"]
    return out


async def assert_published(amqp_url: str, expected: int) -> None:
    messages = await drain_queue(amqp_url)
    assert len(messages) == expected
    assert len({m.message_id for m in messages}) == expected


@pytest.mark.parametrize(
    ("soft", "expected"),
    [
        (False, {"queued": 50, "rejected_quota": 150}),
        (True, {"queued": 100, "rejected_quota": 100}),
    ],
)
async def test_concurrent_requests_never_overshoot(
    settings: Settings,
    db: asyncpg.Connection,
    make_site: MakeSite,
    amqp_url: str,
    soft: bool,
    expected: dict[str, int],
) -> None:
    await make_site(monthly_limit=50, soft=soft, multiplier="2")
    async with gateway_client(settings) as client:
        await wait_for_amqp(client)
        session = client.session
        tally = await fire(session, str(client.make_url("/api/sync")), distinct_events(EVENTS))

    assert dict(tally) == expected
    rows = await billing(db)
    assert rows["billable_ACCEPTED"] == 50
    assert rows["billable_OVERAGE"] == (50 if soft else 0)
    assert rows["unbilled_ACCEPTED"] == expected["rejected_quota"]
    await assert_published(amqp_url, expected["queued"])


@pytest.mark.parametrize("soft", [False, True])
async def test_exact_across_two_gateway_processes(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str, soft: bool
) -> None:
    """SPEC §1.7 as stated (soft limits off: exactly N), and the soft ceiling N×H, across processes."""
    await make_site(monthly_limit=50, soft=soft, multiplier="2")
    gateways = await GatewayProcesses(settings_env(settings), free_port(), workers=2).start()
    try:
        async with ClientSession(connector=TCPConnector(limit=200, force_close=True)) as session:
            tally = await fire(session, f"{gateways.url}/api/sync", distinct_events(EVENTS))
    finally:
        assert gateways.stop() == 0
    queued = 100 if soft else 50
    assert dict(tally) == {"queued": queued, "rejected_quota": EVENTS - queued}
    rows = await billing(db)
    assert (rows["billable_ACCEPTED"], rows["billable_OVERAGE"]) == (50, 50 if soft else 0)
    await assert_published(amqp_url, queued)


async def test_exact_when_redis_stops_mid_run(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    await make_site(monthly_limit=50)
    redis = RedisServer().start()
    bodies = distinct_events(EVENTS)
    try:
        async with gateway_client(settings.with_overrides(redis_url=redis.url())) as client:
            await wait_for_amqp(client)
            url = str(client.make_url("/api/sync"))
            first = await fire(client.session, url, bodies[:30])
            redis.stop()
            second = await fire(client.session, url, bodies[30:])
            redis.start()  # back, empty: the counter is re-seeded exactly from Postgres
            third = await fire(client.session, url, distinct_events(20))
    finally:
        redis.stop()
    tally = first + second + third
    assert first == Counter(queued=30)
    assert dict(tally) == {"queued": 50, "rejected_quota": 170}
    rows = await billing(db)
    assert rows["billable_ACCEPTED"] == 50
    await assert_published(amqp_url, 50)


async def test_stale_redis_counter_is_not_trusted_after_postgres_decided(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """Redis unreachable for one gateway only (its own proxy cut) while its counter survives: events
    decided in Postgres meanwhile must not be forgotten when Redis comes back."""
    from tests.support.proxy import TcpProxy

    await make_site(monthly_limit=20)
    redis = RedisServer().start()
    proxy = await TcpProxy("127.0.0.1", redis.port).start()
    try:
        async with gateway_client(
            settings.with_overrides(redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        ) as client:
            await wait_for_amqp(client)
            url = str(client.make_url("/api/sync"))
            assert await fire(client.session, url, distinct_events(5)) == Counter(queued=5)
            await proxy.cut()
            assert await fire(client.session, url, distinct_events(10)) == Counter(queued=10)
            proxy.restore()
            await asyncio.sleep(1.1)  # past the pipeline's Redis retry interval
            tally = await fire(client.session, url, distinct_events(10))
    finally:
        await proxy.close()
        redis.stop()
    assert tally == Counter(queued=5, rejected_quota=5)
    assert (await billing(db))["billable_ACCEPTED"] == 20


async def test_a_group_member_postgres_refuses_fails_alone(
    settings: Settings, db: asyncpg.Connection, make_site: MakeSite, amqp_url: str
) -> None:
    """Data Postgres refuses (here: a trigger rejecting one label) fails only its own request."""
    await make_site(monthly_limit=1000)
    await db.execute(
        """CREATE FUNCTION refuse_label() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.event_label = 'refused' THEN
               RAISE EXCEPTION 'bad label' USING ERRCODE = '22023'; END IF;
           RETURN NEW; END $$;
           CREATE TRIGGER refuse_label BEFORE INSERT ON ingest_idempotency
           FOR EACH ROW EXECUTE FUNCTION refuse_label();"""
    )
    bodies = distinct_events(60)
    bodies.insert(30, orjson.dumps({"s": "site-a", "url": "https://example.com/refused", "el": "refused"}))
    async with gateway_client(settings) as client:
        await wait_for_amqp(client)
        session = client.session
        url = str(client.make_url("/api/sync"))

        async def one(body: bytes) -> int:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                return r.status

        statuses = await asyncio.gather(*(one(b) for b in bodies))
    assert statuses.count(500) == 1 and statuses[30] == 500
    assert statuses.count(200) == 60
    assert (await billing(db))["billable_ACCEPTED"] == 60
    await assert_published(amqp_url, 60)
