"""Publishing to RabbitMQ with publisher confirms, a bounded wait, and a connection that comes back.

The gateway must start while the broker is down (SPEC §3) and degrade instead of failing, so the
connection is made by a supervised background task; `publish` raises PublishFailed at once while
there is no open connection, and when the confirm does not arrive within the timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from shared import prom
from shared.amqp import INGEST_EXCHANGE, connect_once, connect_robust, declare_topology, reconnect_delays
from shared.amqp_wire import ConfirmConnection, OutgoingMessage, WireError
from shared.logging import get_logger

__all__ = ["EventPublisher", "OutgoingMessage", "PublishFailed"]

CONNECT_TIMEOUT_S = 3.0

log = get_logger("publisher")

# aio-pika raises RuntimeError for a connection closed under it.
CONNECT_ERRORS = (TimeoutError, OSError, RuntimeError, WireError, aio_pika.exceptions.AMQPError)


class PublishFailed(Exception):
    """The broker did not confirm the message (unreachable, nacked, returned or timed out)."""


class EventPublisher:
    """Confirmed, persistent publishes to the `ingest` exchange; many may be in flight at once.

    Two connections: a control connection (aio-pika, robust) declares the topology and serves the
    queue-depth probe; the publishes go over a `ConfirmConnection` (shared/amqp_wire.py), whose
    per-message cost is a fraction of aio-pika's. A supervisor task reopens it when it drops.
    """

    def __init__(self, amqp_url: str, *, timeout_ms: int, exchange_name: str = INGEST_EXCHANGE) -> None:
        self._url = amqp_url
        self._timeout_s = timeout_ms / 1000
        self._exchange_name = exchange_name
        self._control: AbstractRobustConnection | None = None
        self._wire: ConfirmConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._control_task: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = asyncio.Event()

    async def start(self) -> None:
        """Begin connecting in the background; returns immediately."""
        self._task = asyncio.create_task(self._supervise(), name="amqp-publisher")
        self._control_task = asyncio.create_task(self._open_control(), name="amqp-control")

    async def _supervise(self) -> None:
        """Keep a confirm connection open: connect with backoff, wait for it to drop, repeat."""
        delays = reconnect_delays()
        while not self._closing:
            wire: ConfirmConnection | None = None
            try:
                wire = await ConfirmConnection.open(self._url, timeout=CONNECT_TIMEOUT_S)
                await self._declare_topology()
            except BaseException as exc:
                if wire is not None:
                    wire.abort()  # also when cancelled (closing during start-up): no socket left open
                if not isinstance(exc, CONNECT_ERRORS):
                    raise
                if self._closing:
                    return
                delay = next(delays)
                log.warning("amqp_connect_failed", error=str(exc) or type(exc).__name__, retry_in_s=delay)
                await asyncio.sleep(delay)
                continue
            self._wire, delays = wire, reconnect_delays()
            if self._closing:
                return
            self.connected.set()
            log.info("amqp_connected")
            await wire.wait_closed()
            self._wire = None
            if not self._closing:
                log.warning("amqp_connection_lost", reason=wire.close_reason)

    async def _declare_topology(self) -> None:
        """Declare the contract topology on a short-lived connection (after every reconnect: the broker
        may have come back without it)."""
        connection = await connect_once(self._url, timeout=CONNECT_TIMEOUT_S)
        try:
            async with connection.channel() as channel:
                await declare_topology(channel)
        finally:
            await asyncio.shield(connection.close())

    async def _open_control(self) -> None:
        """The robust control connection for the queue-depth probe (it reconnects by itself once made)."""
        delays = reconnect_delays()
        while not self._closing and self._control is None:
            try:
                self._control = await connect_robust(self._url, timeout=CONNECT_TIMEOUT_S)
            except CONNECT_ERRORS as exc:
                if self._closing:
                    return
                log.warning("amqp_control_connect_failed", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(next(delays))

    @property
    def connection(self) -> AbstractRobustConnection | None:
        """The control connection once made (the metrics probe opens its own channel on it)."""
        return self._control

    @property
    def is_ready(self) -> bool:
        return self._wire is not None and self._wire.is_open

    async def publish(self, message: OutgoingMessage) -> None:
        """Publish and wait for the broker's confirm, at most `PUBLISH_TIMEOUT_MS`."""
        [failure] = await self.publish_many([message])
        if failure is not None:
            raise failure

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> list[PublishFailed | None]:
        """Publish with all confirms in flight at once, within one `PUBLISH_TIMEOUT_MS`; one result per
        message (None = confirmed)."""
        if not messages:
            return []
        wire = self._wire
        if wire is None or not wire.is_open:
            return [self._failed("broker_unavailable") for _ in messages]
        try:
            futures = wire.publish_many(self._exchange_name, messages)
        except WireError as exc:
            return [self._failed(str(exc) or "broker_unavailable") for _ in messages]
        try:
            _done, pending = await asyncio.wait(futures, timeout=self._timeout_s)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        out: list[PublishFailed | None] = []
        for future in futures:
            if future in pending:
                future.cancel()
                out.append(self._failed("confirm_timeout"))
            elif (error := future.exception()) is not None:
                out.append(self._failed(str(error) or type(error).__name__))
            else:
                prom.observe_publish_confirm(future.result())
                out.append(None)
        return out

    @staticmethod
    def _failed(reason: str) -> PublishFailed:
        prom.count_publish_failure(reason.split(":", 1)[0])
        return PublishFailed(reason)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            # aio-pika may swallow the cancellation mid-connect; the loop also stops on `_closing`,
            # once the wire it may still have opened is closed below.
            await asyncio.wait({self._task}, timeout=5)
        if self._wire is not None:
            await self._wire.close()
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=5)
        if self._control_task is not None:
            self._control_task.cancel()
            await asyncio.wait({self._control_task}, timeout=5)
        if self._control is not None:
            await self._control.close()
