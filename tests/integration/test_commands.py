"""RPC over AMQP (shared/commands.py) and the worker runtime (shared/worker.py) against real servers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from services.reconciler.main import Reconciler, ReconcilerConfig
from shared.amqp import DEAD_LETTER_QUEUE, FREEZER_QUEUE, RECONCILER_QUEUE
from shared.commands import (
    CommandClient,
    CommandRejected,
    CommandRequest,
    CommandTimeout,
    CommandUnavailable,
    reply_http_status,
)
from shared.months import current_year_month
from shared.settings import Settings
from shared.worker import Schedule, Worker
from tests.conftest import free_port
from tests.integration.reconciler_support import add_rows, create_site
from tests.support.proxy import TcpProxy

QUEUE = FREEZER_QUEUE  # any command queue of the topology; these tests own the vhost's queues


async def queue_depth(amqp_url: str, name: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def wait_for(predicate: object, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = predicate() if callable(predicate) else predicate
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.05)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[CommandClient]:
    client = CommandClient(settings.amqp_url, timeout_s=5)
    await client.start()
    await asyncio.wait_for(client.connected.wait(), 10)
    yield client
    await client.close()


def make_worker(settings: Settings, **kwargs: object) -> Worker:
    return Worker(name="test-worker", settings=settings, command_queue=QUEUE, http_port=0, **kwargs)  # type: ignore[arg-type]


async def test_round_trip_rejection_and_unknown_command(settings: Settings, client: CommandClient) -> None:
    worker = make_worker(settings)
    seen: list[CommandRequest] = []

    async def echo(request: CommandRequest) -> dict[str, object]:
        seen.append(request)
        if request.args.get("bad"):
            raise CommandRejected("bad_month", reason="from > to")
        return {"echo": request.args["x"]}

    worker.command("echo", echo)
    await worker.start()
    try:
        await worker.wait_amqp()
        await wait_for(lambda: worker.consumer.consuming)
        reply = await client.call(QUEUE, "echo", {"x": 42}, request_id="rid-1")
        assert reply == {"ok": True, "echo": 42}
        assert seen[0].request_id == "rid-1" and seen[0].name == "echo"

        rejected = await client.call(QUEUE, "echo", {"bad": True}, request_id="rid-2")
        assert rejected == {"ok": False, "error": "bad_month", "status": 400, "reason": "from > to"}
        assert reply_http_status(rejected) == 400

        unknown = await client.call(QUEUE, "nope", {}, request_id="rid-3")
        assert unknown["error"] == "unknown_command" and unknown["status"] == 400
        assert await queue_depth(settings.amqp_url, QUEUE) == 0
        assert await queue_depth(settings.amqp_url, DEAD_LETTER_QUEUE) == 0
    finally:
        await worker.stop()


async def test_timeout_leaves_command_queued_and_a_later_worker_runs_it(
    settings: Settings, client: CommandClient
) -> None:
    with pytest.raises(CommandTimeout):
        await client.call(QUEUE, "echo", {"x": 1}, request_id="late", timeout_s=0.3)
    assert await queue_depth(settings.amqp_url, QUEUE) == 1

    ran: list[str] = []

    async def echo(request: CommandRequest) -> dict[str, object]:
        ran.append(request.request_id)
        return {}

    worker = make_worker(settings)
    worker.command("echo", echo)
    handled = await worker.burst()
    assert handled == 1 and ran == ["late"]
    assert await queue_depth(settings.amqp_url, QUEUE) == 0


async def test_failing_handler_is_redelivered_then_dead_lettered_with_an_error_reply(
    settings: Settings, client: CommandClient
) -> None:
    attempts: list[int] = []

    async def boom(request: CommandRequest) -> dict[str, object]:
        attempts.append(request.delivery_count)
        raise RuntimeError("kaput")

    worker = make_worker(settings)
    worker.command("boom", boom)
    await worker.start()
    try:
        await worker.wait_amqp()
        await wait_for(lambda: worker.consumer.consuming)
        reply = await client.call(QUEUE, "boom", {}, request_id="poison", timeout_s=20)
        assert reply["ok"] is False and reply["error"] == "command_failed" and reply["status"] == 500
        await wait_for(lambda: queue_depth(settings.amqp_url, DEAD_LETTER_QUEUE))
        assert await queue_depth(settings.amqp_url, QUEUE) == 0
        # RabbitMQ dead-letters when the count of previous deliveries exceeds x-delivery-limit.
        assert attempts == list(range(worker.consumer.delivery_limit + 1))
    finally:
        await worker.stop()


async def test_stop_drains_within_bound_and_returns_unfinished_command(
    settings: Settings, client: CommandClient
) -> None:
    started = asyncio.Event()

    async def slow(request: CommandRequest) -> dict[str, object]:
        started.set()
        await asyncio.sleep(3600)
        return {}

    worker = make_worker(settings, drain_timeout_s=0.2)
    worker.command("slow", slow)
    await worker.start()
    await worker.wait_amqp()
    await wait_for(lambda: worker.consumer.consuming)
    call = asyncio.create_task(client.call(QUEUE, "slow", {}, request_id="unfinished", timeout_s=30))
    await asyncio.wait_for(started.wait(), 10)
    await worker.stop()
    # Not acked: the broker has it again for the next worker.
    await wait_for(lambda: queue_depth(settings.amqp_url, QUEUE))

    async def quick(request: CommandRequest) -> dict[str, object]:
        return {"finished_by": "second"}

    second = make_worker(settings)
    second.command("slow", quick)
    await second.start()
    try:
        reply = await asyncio.wait_for(call, 20)
        assert reply == {"ok": True, "finished_by": "second"}
    finally:
        await second.stop()


async def test_health_ready_and_a_dying_side_task_stops_the_process(settings: Settings) -> None:
    worker = make_worker(settings)
    crash = asyncio.Event()
    ticks: list[int] = []

    async def tick() -> bool:
        ticks.append(1)
        return False

    async def fragile() -> None:
        await crash.wait()
        raise ValueError("side task bug")

    worker.schedule(Schedule("tick", tick, interval_s=3600))
    worker.side_task("fragile", fragile)
    run = asyncio.create_task(worker.run())
    await wait_for(lambda: worker.consumer.consuming)
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{worker.http_port}"
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["checks"] == {"postgres": True, "rabbitmq": True}
    assert ticks == [1]
    crash.set()
    assert await asyncio.wait_for(run, 30) == 1


async def test_not_ready_without_broker_and_unavailable_client(settings: Settings) -> None:
    dead = settings.with_overrides(amqp_url="amqp://guest:guest@127.0.0.1:1/")
    worker = make_worker(dead)
    await worker.start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{worker.http_port}/readyz") as resp,
        ):
            body = await resp.json()
            assert resp.status == 503 and body["checks"]["rabbitmq"] is False
    finally:
        await worker.stop()
    client = CommandClient(dead.amqp_url, timeout_s=0.5)
    await client.start()
    try:
        with pytest.raises(CommandUnavailable):
            await client.call(QUEUE, "echo", {}, request_id=uuid.uuid4().hex)
    finally:
        await client.close()


async def test_a_postgres_outage_is_waited_out_not_dead_lettered(
    settings: Settings, client: CommandClient, db: asyncpg.Connection
) -> None:
    """SPEC §2: only poison goes to the dead-letter exchange. A command met by a dependency outage
    used to be returned and redelivered at once, five times in ~30 ms, then dead-lettered unrun."""
    site = await create_site(db)
    await add_rows(db, site, current_year_month(), 2)
    # Postgres "down": nothing listens on the port yet (connections refused at once); "back": a proxy
    # to the real server starts listening there.
    postgres = TcpProxy("127.0.0.1", 5432)
    postgres.port = free_port()
    database = settings.database_url.rsplit("/", 1)[1]
    proxied = settings.with_overrides(
        database_url=f"postgresql://postgres@127.0.0.1:{postgres.port}/{database}"
    )
    reconciler = Reconciler(proxied, ReconcilerConfig(schedules=False, http_port=0))
    await reconciler.worker.start()
    try:
        await reconciler.worker.wait_amqp()
        await wait_for(lambda: reconciler.worker.consumer.consuming)
        with capture_logs() as logs:
            call = asyncio.create_task(
                client.call(RECONCILER_QUEUE, "enqueue", {}, request_id="outage", timeout_s=30)
            )
            deadline = time.monotonic() + 20  # the command meets the outage: attempts, with backoff
            while [line["event"] for line in logs].count("command_dependency_unavailable") < 3:
                assert time.monotonic() < deadline and not call.done(), logs
                await asyncio.sleep(0.05)
            assert not call.done()
            await postgres.start()
            reply = await call
    finally:
        await reconciler.worker.stop()
        await postgres.close()
    assert reply["ok"] is True and reply["enqueued"] == 2
    events = [line["event"] for line in logs]
    # Waited out in place: no delivery was spent (each one counts towards the dead-letter limit).
    assert "command_failed" not in events and events.count("command_dependency_unavailable") >= 3
    assert await queue_depth(settings.amqp_url, DEAD_LETTER_QUEUE) == 0
    assert await db.fetchval("SELECT count(*) FROM billing_reconciliation_jobs WHERE site_id = $1", site) == 2
