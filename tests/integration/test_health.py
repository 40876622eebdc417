"""`/healthz` and `/readyz` (SPEC §11) under real faults: the gateway is ready while Postgres answers,
whatever Redis and RabbitMQ do; a worker is ready while Postgres answers and its broker channel is open."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from shared.amqp import FREEZER_QUEUE
from shared.settings import Settings
from shared.worker import Worker
from tests.conftest import PG_HOST, PG_PORT, amqp_url_for, free_port, pg_dsn
from tests.support.gateway import gateway_client
from tests.support.proxy import TcpProxy

Client = TestClient[Any, Any]


async def probe(client: Client, path: str) -> tuple[int, dict[str, Any]]:
    response = await client.get(path)
    return response.status, await response.json()


async def wait_status(client: Client, path: str, status: int, timeout_s: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        got, body = await probe(client, path)
        if got == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} stayed {got} {body}, expected {status}")
        await asyncio.sleep(0.05)


async def test_gateway_with_dead_postgres_is_alive_but_not_ready(settings: Settings) -> None:
    dead = settings.with_overrides(database_url=pg_dsn("revkernel", port=free_port()))
    async with gateway_client(dead) as client:
        assert (await probe(client, "/healthz"))[0] == 200
        status, body = await probe(client, "/readyz")
        assert status == 503
        assert body["ok"] is False and body["checks"]["postgres"] is False


async def test_gateway_without_redis_and_rabbitmq_is_ready(settings: Settings) -> None:
    degraded = settings.with_overrides(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", amqp_url=amqp_url_for("x", port=free_port())
    )
    async with gateway_client(degraded) as client:
        status, body = await probe(client, "/readyz")
        assert status == 200
        assert body["checks"] == {"postgres": True, "redis": False, "rabbitmq": False}
        assert (await probe(client, "/healthz"))[0] == 200


async def test_gateway_readiness_follows_postgres_through_a_cut(settings: Settings) -> None:
    proxy = await TcpProxy(PG_HOST, PG_PORT).start()
    database = settings.database_url.rsplit("/", 1)[1]
    through_proxy = settings.with_overrides(database_url=pg_dsn(database, port=proxy.port))
    try:
        async with gateway_client(through_proxy) as client:
            await wait_status(client, "/readyz", 200)
            await proxy.cut()
            await wait_status(client, "/readyz", 503)
            assert (await probe(client, "/healthz"))[0] == 200
            proxy.restore()
            await wait_status(client, "/readyz", 200)
    finally:
        await proxy.close()


async def _worker_get(worker: Worker, path: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{worker.http_port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return r.status, await r.json()


async def _wait_worker(worker: Worker, path: str, status: int, timeout_s: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        got, body = await _worker_get(worker, path)
        if got == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"worker {path} stayed {got} {body}, expected {status}")
        await asyncio.sleep(0.05)


async def test_worker_ready_needs_postgres_and_the_broker(settings: Settings) -> None:
    amqp_proxy = await TcpProxy("127.0.0.1", 5672).start()
    vhost = settings.amqp_url.rsplit("/", 1)[1]
    worker = Worker(
        name="freezer", settings=settings.with_overrides(amqp_url=amqp_url_for(vhost, port=amqp_proxy.port)),
        command_queue=FREEZER_QUEUE, http_port=0, http_host="127.0.0.1",
    )
    await worker.start()
    try:
        body = await _wait_worker(worker, "/readyz", 200)
        assert body["checks"] == {"postgres": True, "rabbitmq": True}
        await amqp_proxy.cut()
        body = await _wait_worker(worker, "/readyz", 503)
        assert body["checks"]["rabbitmq"] is False
        assert (await _worker_get(worker, "/healthz"))[0] == 200
    finally:
        await worker.stop()
        await amqp_proxy.close()


async def test_worker_with_dead_postgres_is_alive_but_not_ready(settings: Settings) -> None:
    dead = settings.with_overrides(database_url=pg_dsn("revkernel", port=free_port()))
    worker = Worker(
        name="freezer", settings=dead, command_queue=FREEZER_QUEUE, http_port=0, http_host="127.0.0.1"
    )
    await worker.start()
    try:
        await worker.wait_amqp()
        status, body = await _worker_get(worker, "/readyz")
        assert status == 503 and body["checks"] == {"postgres": False, "rabbitmq": True}
        assert (await _worker_get(worker, "/healthz"))[0] == 200
    finally:
        await worker.stop()
