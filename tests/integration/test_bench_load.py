"""The bench's load and its loss-check counters for real: bench/load.lua run by wrk against an in-process
aiohttp server that records what it received, and the queue drain against the test vhost."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from aiohttp import web

from bench.stores import drain_queue
from bench.wrkload import LoadSpec, WrkResult, parse_wrk_output, send_window_s
from shared.amqp import INGEST_EXCHANGE, INGEST_QUEUE
from tests.conftest import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (make test installs it: scripts/ensure_wrk.sh)"
)

SITES = {f"site-pub-{i}" for i in range(1, 17)}
Answer = Callable[[int, Any], tuple[int, dict[str, Any]]]


class Recorder:
    """An /api/sync that keeps every body and answers with `answer(request_number, body)`."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.bodies: list[Any] = []
        self.statuses: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.bodies.append(body)
        status, payload = self.answer(len(self.bodies), body)
        self.statuses[str(payload.get("status", status))] += 1
        return web.json_response(payload, status=status)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Any]]:
    runners: list[web.AppRunner] = []

    async def start(answer: Answer) -> tuple[str, Recorder]:
        recorder = Recorder(answer)
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post("/api/sync", recorder.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}/api/sync", recorder

    yield start
    for runner in runners:
        await runner.cleanup()


async def run_wrk(url: str, *, batch: int = 0, rate: float = 0, duration_s: int = 3) -> WrkResult:
    spec = LoadSpec(url, duration_s, 16, 1, batch, rate, send_window_s(duration_s), uuid.uuid4().hex[:8])
    proc = await asyncio.create_subprocess_exec(*spec.argv(), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")
    return parse_wrk_output(out.decode(errors="replace"))


def single_answer(n: int, _body: Any) -> tuple[int, dict[str, Any]]:
    """Every gate outcome in turn: queued, degraded, duplicate, rate limited."""
    kind = n % 4
    if kind == 0:
        return 200, {"ok": True, "status": "queued", "ingest_id": str(n)}
    if kind == 1:
        return 200, {"ok": True, "status": "degraded", "ingest_id": str(n)}
    if kind == 2:
        return 200, {"ok": True, "status": "duplicate"}
    return 429, {"ok": False, "status": "rate_limited", "error": "rate_limited"}


async def test_single_events_are_unique_and_every_answer_is_tallied(serve: Any) -> None:
    url, recorder = await serve(single_answer)
    result = await run_wrk(url)

    received = len(recorder.bodies)
    assert received > 0
    assert result.sent_requests == result.answers == received  # nothing left in flight
    urls = [body["url"] for body in recorder.bodies]
    assert len(set(urls)) == len(urls)
    assert {body["s"] for body in recorder.bodies} <= SITES
    assert result.count("queued") == recorder.statuses["queued"]
    assert result.count("degraded") == recorder.statuses["degraded"]
    assert result.count("duplicate") == recorder.statuses["duplicate"]
    assert result.non_2xx == recorder.statuses["rate_limited"]
    assert result.accepted == recorder.statuses["queued"] + recorder.statuses["degraded"]
    assert result.events_2xx == received - recorder.statuses["rate_limited"]


def batch_answer(_n: int, body: Any) -> tuple[int, dict[str, Any]]:
    events = body["events"]
    results = [{"status": "queued", "ingest_id": str(i)} for i in range(len(events) - 1)]
    results.append({"status": "duplicate"})
    return 200, {"ok": True, "results": results, "accepted": len(events) - 1, "duplicates": 1,
                 "rejected": 0, "invalid": 0}


async def test_batches_of_50_events_of_one_site_and_accepted_counts(serve: Any) -> None:
    url, recorder = await serve(batch_answer)
    result = await run_wrk(url, batch=50)

    batches = recorder.bodies
    assert len(batches) == result.answers == result.sent_requests > 0
    assert all(len(b["events"]) == 50 and len({e["s"] for e in b["events"]}) == 1 for b in batches)
    assert {b["events"][0]["s"] for b in batches} <= SITES
    urls = [e["url"] for b in batches for e in b["events"]]
    assert len(set(urls)) == len(urls) == 50 * len(batches)
    assert result.events_2xx == 50 * len(batches)
    assert result.accepted == 49 * len(batches)
    assert result.count("duplicate") == len(batches)


async def test_paced_load_never_runs_ahead_of_its_schedule(serve: Any) -> None:
    url, recorder = await serve(single_answer)
    result = await run_wrk(url, rate=100, duration_s=3)

    # One slot every 10 ms over a 2.5 s sending window: at most 250 requests, however fast the server.
    assert 0 < len(recorder.bodies) <= 250
    assert result.sent_requests == result.answers == len(recorder.bodies)


async def test_drain_counts_events_inside_batch_messages(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(INGEST_EXCHANGE)

        async def publish(body: Any, headers: dict[str, Any] | None = None) -> None:
            message = aio_pika.Message(json.dumps(body).encode(), headers=headers,
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, routing_key="event.site-pub-1")

        for key in ("s1", "s2", "s3", "s1"):  # s1 published twice
            await publish({"s": "site-pub-1", "idempotency_key": key})
        for b in range(2):
            events = [{"s": "site-pub-1", "idempotency_key": f"b{b}-{i}"} for i in range(4)]
            await publish({"events": events}, {"x-event-count": 4})

    drained = await drain_queue(amqp_url, INGEST_QUEUE)
    assert (drained.messages, drained.events, drained.distinct_keys, drained.malformed) == (6, 12, 11, 0)
    again = await drain_queue(amqp_url, INGEST_QUEUE)
    assert (again.messages, again.events) == (0, 0)


def test_clients_bench_measures_both_clients_in_its_own_vhost_and_redis(redis_server: Any) -> None:
    """`python -m bench.clients_bench` runs end to end on a private vhost and Redis, and cleans up."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    vhost = f"rk-clients-test-{uuid.uuid4().hex[:8]}"
    run = subprocess.run(
        [sys.executable, "-m", "bench.clients_bench", "--seconds", "0.3", "--in-flight", "4",
         "--redis-calls", "20", "--vhost", vhost, "--redis-url", redis_server.url(12)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert sum(line.startswith("AMQP  aio-pika") for line in lines) == 3
    assert sum(line.startswith("AMQP  amqp_wire") for line in lines) == 3
    assert sum(line.startswith("Redis resp_wire") for line in lines) == 3
    listed = subprocess.run(["rabbitmqctl", "list_vhosts", "-q"], capture_output=True, text=True, check=True)
    assert vhost not in listed.stdout.split()
