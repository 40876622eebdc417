"""Publishing to RabbitMQ with publisher confirms, a bounded wait, and a connection that comes back.

The gateway must start while the broker is down (SPEC §3) and degrade instead of failing, so the
connection is made by a supervised background task; `publish` raises PublishFailed at once while
there is no channel, and when the confirm does not arrive within the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from shared import prom
from shared.amqp import INGEST_EXCHANGE, connect_robust, declare_topology
from shared.logging import get_logger

log = get_logger("publisher")


DEFAULT_CHANNELS = 4


class PublishFailed(Exception):
    """The broker did not confirm the message (unreachable, nacked, returned or timed out)."""


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    body: bytes
    routing_key: str
    message_id: str
    headers: dict[str, int | str] = field(default_factory=dict)


class EventPublisher:
    """Confirmed, persistent publishes to the `ingest` exchange; many may be in flight at once."""

    def __init__(
        self,
        amqp_url: str,
        *,
        timeout_ms: int,
        exchange_name: str = INGEST_EXCHANGE,
        channels: int = DEFAULT_CHANNELS,
    ) -> None:
        self._url = amqp_url
        self._timeout_s = timeout_ms / 1000
        self._exchange_name = exchange_name
        self._channel_count = max(1, channels)
        self._connection: AbstractRobustConnection | None = None
        # Several confirm channels: the broker runs each channel in its own process, so spreading
        # publishes over a few of them lowers confirm latency under load (measured in docs/performance.md).
        self._channels: list[AbstractChannel] = []
        self._exchanges: list[AbstractExchange] = []
        self._next = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = asyncio.Event()

    async def start(self) -> None:
        """Begin connecting in the background; returns immediately."""
        self._task = asyncio.create_task(self._connect_forever(), name="amqp-connect")

    async def _connect_forever(self) -> None:
        delay = 0.2
        while not self._closing:
            try:
                connection = await connect_robust(self._url, timeout=3)
                channels: list[AbstractChannel] = []
                for _ in range(self._channel_count):
                    channels.append(await connection.channel(publisher_confirms=True, on_return_raises=True))
                await declare_topology(channels[0])
                self._exchanges = [await c.get_exchange(self._exchange_name) for c in channels]
                self._connection, self._channels = connection, channels
                self.connected.set()
                log.info("amqp_connected")
                return
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                log.warning("amqp_connect_failed", error=str(exc) or type(exc).__name__, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @property
    def connection(self) -> AbstractRobustConnection | None:
        """The broker connection once made (metrics open their own channel on it)."""
        return self._connection

    @property
    def is_ready(self) -> bool:
        return any(not channel.is_closed for channel in self._channels)

    def _pick_exchange(self) -> AbstractExchange | None:
        """The next open channel's exchange, round robin."""
        for _ in range(len(self._channels)):
            index = self._next % len(self._channels)
            self._next += 1
            if not self._channels[index].is_closed:
                return self._exchanges[index]
        return None

    async def publish(self, message: OutgoingMessage) -> None:
        """Publish and wait for the broker's confirm, at most `PUBLISH_TIMEOUT_MS`."""
        [failure] = await self.publish_many([message])
        if failure is not None:
            raise failure

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> list[PublishFailed | None]:
        """Publish with all confirms in flight at once, within one `PUBLISH_TIMEOUT_MS`; one result per
        message (None = confirmed). One task per message (no wait_for wrapper task each)."""
        tasks = [asyncio.ensure_future(self._send(m)) for m in messages]
        try:
            _done, pending = await asyncio.wait(tasks, timeout=self._timeout_s)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        out: list[PublishFailed | None] = []
        for task in tasks:
            if task in pending:
                prom.count_publish_failure("confirm_timeout")
                out.append(PublishFailed("confirm_timeout"))
                continue
            error = task.exception()
            if error is None:
                out.append(None)
            elif isinstance(error, PublishFailed):
                out.append(error)
            else:
                out.append(PublishFailed(repr(error)))
        return out

    async def _send(self, message: OutgoingMessage) -> None:
        exchange = self._pick_exchange()
        if exchange is None:
            prom.count_publish_failure("broker_unavailable")
            raise PublishFailed("broker_unavailable")
        started = time.perf_counter()
        try:
            await exchange.publish(
                aio_pika.Message(
                    message.body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message.message_id,
                    headers=dict(message.headers),
                ),
                routing_key=message.routing_key,
                mandatory=True,
            )
        except (aio_pika.exceptions.AMQPError, OSError, RuntimeError) as exc:
            prom.count_publish_failure(type(exc).__name__)
            raise PublishFailed(type(exc).__name__) from exc
        prom.observe_publish_confirm(time.perf_counter() - started)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connection is not None:
            await self._connection.close()
