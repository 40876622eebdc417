"""SPEC §11: the billing counters are fleet-wide totals. Known traffic through two `revkernel gateway`
processes shows up exactly in `/api/metrics` of either one, and survives restarting both."""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiohttp import ClientSession

from shared.billing_counters import COUNTER_NAMES, COUNTERS_KEY
from shared.redis_client import create_redis
from shared.settings import Settings
from shared.sites import create_site
from tests.conftest import CRON_SECRET, amqp_url_for, free_port, settings_env
from tests.support.gateway_process import GatewayProcess

EXPECTED = {
    "billing_ingest_allowed_total": 7,
    "billing_ingest_duplicate_total": 2,
    "billing_ingest_rejected_quota_total": 1,
    "billing_ingest_rate_limited_total": 2,
    "billing_ingest_overage_total": 1,
    "billing_ingest_degraded_total": 1,
    "billing_reconciliation_runs_ok_total": 0,
    "billing_reconciliation_runs_failed_total": 0,
}


def event(site: str) -> dict[str, Any]:
    return {"s": site, "url": f"https://example.com/{uuid.uuid4().hex}"}


async def sync(session: ClientSession, gateway: GatewayProcess, body: Any) -> tuple[int, dict[str, Any]]:
    async with session.post(
        f"{gateway.url}/api/sync", data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    ) as response:
        return response.status, await response.json()


async def fleet_metrics(session: ClientSession, gateway: GatewayProcess) -> dict[str, Any]:
    async with session.get(
        f"{gateway.url}/api/metrics", headers={"Authorization": f"Bearer {CRON_SECRET}"}
    ) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def wait_for_counters(session: ClientSession, gateway: GatewayProcess, timeout_s: float = 15) -> None:
    """Poll (the flush runs every 0.5 s in each process) until the totals are exactly EXPECTED."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = await fleet_metrics(session, gateway)
        counters = {name: body[name] for name in COUNTER_NAMES}
        if counters == EXPECTED:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"counters {counters} never became {EXPECTED}")
        await asyncio.sleep(0.1)


async def test_counters_are_fleet_wide_and_survive_restarts(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await create_site(db, public_id="acc", allowed_origins=["*"], monthly_limit=1000)
    await create_site(db, public_id="quota", allowed_origins=["*"], monthly_limit=2, soft_limit_enabled=False)
    await create_site(
        db, public_id="over", allowed_origins=["*"], monthly_limit=1, soft_limit_enabled=True,
        hard_cap_multiplier=Decimal(2),
    )
    await create_site(db, public_id="rl", allowed_origins=["*"], monthly_limit=1000, rate_limit_per_minute=1)

    env = settings_env(settings)
    # Gateway B has no broker (a port nobody listens on): what it accepts is captured in the buffer.
    env_b = {**env, "AMQP_URL": amqp_url_for("x", port=free_port())}
    a = GatewayProcess(env, tmp_path / "gateway-a.log")
    b = GatewayProcess(env_b, tmp_path / "gateway-b.log")
    try:
        await asyncio.gather(a.start(), b.start(require_broker=False))
        async with ClientSession() as session:
            e1 = event("acc")
            status, body = await sync(session, a, {"events": [e1, e1, event("acc")]})
            assert status == 200
            assert [r["status"] for r in body["results"]] == ["queued", "duplicate", "queued"]
            answers = [(await sync(session, a, event("quota")))[1]["status"] for _ in range(3)]
            assert answers == ["queued", "queued", "rejected_quota"]
            first = (await sync(session, a, event("over")))[1]
            second = (await sync(session, a, event("over")))[1]
            assert first.get("overage") is None and second["overage"] is True

            status, body = await sync(session, b, {"events": [event("rl"), event("rl")]})
            assert (status, body["status"]) == (429, "rate_limited")
            e3 = event("acc")
            status, body = await sync(session, b, {"events": [e3, e3]})
            assert status == 200 and [r["status"] for r in body["results"]] == ["degraded", "duplicate"]

            # Either process reports the fleet's totals once both have flushed.
            await wait_for_counters(session, a)
            await wait_for_counters(session, b)

        assert list(await asyncio.gather(a.stop(), b.stop())) == [0, 0]
        redis = create_redis(settings.redis_url)
        try:
            raw = await redis.hgetall(COUNTERS_KEY)
            stored = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
        finally:
            await redis.aclose()
        assert {name: stored.get(name, 0) for name in COUNTER_NAMES} == EXPECTED

        await asyncio.gather(a.start(), b.start(require_broker=False))
        async with ClientSession() as session:
            assert {k: v for k, v in (await fleet_metrics(session, a)).items() if k in EXPECTED} == EXPECTED
            assert {k: v for k, v in (await fleet_metrics(session, b)).items() if k in EXPECTED} == EXPECTED
    finally:
        a.kill()
        b.kill()
