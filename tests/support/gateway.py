"""Running the gateway for a test: in-process (aiohttp TestServer) or as `revkernel gateway` processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import orjson
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.app import build_app
from shared.amqp import INGEST_QUEUE
from shared.settings import Settings
from tests.support.proxy import TcpProxy

V1_BUCKET_S = 5  # SPEC §4: v1 keys take the server time floored to 5 s


def sync_event(site: str = "site-a", url: str | None = None, **extra: Any) -> dict[str, Any]:
    """A single event for `/api/sync` with a URL of its own (so a distinct idempotency key)."""
    return {"s": site, "url": url or f"https://example.com/{uuid.uuid4().hex}", **extra}


async def post_sync(
    client: TestClient[Any, Any], body: Any, **headers: str
) -> tuple[int, dict[str, Any], Any]:
    """POST `body` (JSON-encoded unless bytes) to `/api/sync`: (status, JSON answer, headers)."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    response = await client.post(
        "/api/sync", data=raw, headers={"Content-Type": "application/json", **headers}
    )
    return response.status, await response.json(), response.headers


@contextlib.asynccontextmanager
async def gateway_client(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """The whole gateway app on a free port, with a client; waits until the broker is connected
    when the AMQP URL is reachable (so "degraded" never comes from a slow start)."""
    app = build_app(settings)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def gateway_via_broker_proxy(
    settings: Settings,
) -> AsyncIterator[tuple[TestClient[Any, Any], TcpProxy]]:
    """The gateway app with its broker reached through a TcpProxy the test can cut; connected when
    yielded. The proxy is closed afterwards."""
    broker = urlsplit(settings.amqp_url)
    proxy = await TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672).start()
    proxied = broker._replace(netloc=f"{broker.username}:{broker.password}@127.0.0.1:{proxy.port}")
    try:
        async with gateway_client(settings.with_overrides(amqp_url=urlunsplit(proxied))) as client:
            await wait_for_amqp(client)
            yield client, proxy
    finally:
        await proxy.close()


async def early_in_a_key_bucket(margin_s: float = 2.0) -> None:
    """Until `margin_s` or more remain of the current 5 s v1 key bucket, so that two posts of one event
    made now share a key (else one crossing the bucket's end is a new event, and a test of `duplicate`
    fails one run in a few hundred)."""
    remaining = V1_BUCKET_S - time.time() % V1_BUCKET_S
    if remaining < margin_s:
        await asyncio.sleep(remaining + 0.01)


async def raw_request(
    port: int, method: str, path: str, header: bytes, body: bytes = b""
) -> tuple[int, dict[str, Any]]:
    """One HTTP request over a plain socket with one header line sent as raw bytes (clients encode
    headers; this sends bytes they would not), answered with JSON: (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".encode()
        + header
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(payload)


async def drain_queue(
    amqp_url: str, queue_name: str = INGEST_QUEUE
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message now in `queue_name` (acked, so the queue is empty afterwards)."""
    connection = await aio_pika.connect(amqp_url)
    messages = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        while True:
            message = await queue.get(no_ack=False, fail=False, timeout=5)
            if message is None:
                break
            await message.ack()
            messages.append(message)
    return messages


def published_events(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[dict[str, Any]]:
    """The events inside messages (a batch message carries `{"events": [...]}`)."""
    events: list[dict[str, Any]] = []
    for message in messages:
        body = orjson.loads(message.body)
        events.extend(body.get("events", [body]))
    return events


class GatewayProcesses:
    """`revkernel gateway --workers N` as a subprocess on a free port."""

    def __init__(self, env: dict[str, str], port: int, workers: int = 2) -> None:
        self.env = {**env, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port)}
        self.port = port
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 30) -> GatewayProcesses:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "gateway", "--workers", str(self.workers)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if os.environ.get("RK_TEST_QUIET_GATEWAY") else None,
        )
        deadline = time.monotonic() + timeout_s
        async with ClientSession() as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    async with session.get(f"{self.url}/readyz") as response:
                        body = await response.json()
                        if response.status == 200 and body["checks"]["rabbitmq"]:
                            return self
                await asyncio.sleep(0.1)
        raise RuntimeError("gateway processes did not become ready")

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.process = None
        return code


async def wait_for_amqp(client: TestClient[Any, Any], timeout_s: float = 15) -> None:
    """Until the gateway's publisher reports a channel (readiness says rabbitmq: true)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = await client.get("/readyz")
        body = await response.json()
        if body["checks"]["rabbitmq"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway never connected to RabbitMQ")
