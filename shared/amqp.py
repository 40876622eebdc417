"""RabbitMQ connection and the contract topology of SPEC §2, declared idempotently."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractRobustConnection
from aio_pika.connection import make_url

INGEST_EXCHANGE = "ingest"
INGEST_QUEUE = "ingest.events"
INGEST_BINDING = "event.#"
COMMANDS_EXCHANGE = "billing.commands"
RECONCILER_QUEUE = "reconciler.commands"
FREEZER_QUEUE = "freezer.commands"
DEAD_LETTER_EXCHANGE = "billing.dead-letter"
DEAD_LETTER_QUEUE = "billing.dead-letter"
COMMAND_DELIVERY_LIMIT = 5


def ingest_routing_key(site_public_id: str) -> str:
    """Routing key of an accepted event: `event.<site_public_id>`."""
    return f"event.{site_public_id}"


def reconnect_delays(first_s: float = 0.2, cap_s: float = 5.0) -> Iterator[float]:
    """Seconds to wait before each further connection attempt: doubling from `first_s` up to `cap_s`."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, cap_s)


async def connect_robust(url: str, *, timeout: float = 5) -> AbstractRobustConnection:
    """A reconnecting connection (channels and declarations are restored after a broker restart).

    aio-pika's reconnection task outlives a cancelled `aio_pika.connect_robust` (it logs "cancelled,
    reconnecting" and retries forever), which kept a process that stopped during start-up alive; so
    the connection object is made first and closed if its first connect fails or is cancelled.
    """
    connection = aio_pika.RobustConnection(make_url(url))
    await _first_connect(connection, timeout)
    return connection


async def connect_once(url: str, *, timeout: float = 5) -> AbstractConnection:
    """A plain connection (no reconnect), closed if its connect fails or is cancelled midway, so no
    socket outlives a process stopping during start-up."""
    connection = aio_pika.Connection(make_url(url))
    await _first_connect(connection, timeout)
    return connection


async def _first_connect(connection: aio_pika.Connection, timeout: float) -> None:
    """Connect, closing the connection if that fails. A cancellation lets the handshake finish (within
    `timeout`) before closing: aiormq's clean-up of a handshake cut short left its socket to the broker
    open about one time in ten (a process stopping during start-up)."""
    connecting = asyncio.ensure_future(connection.connect(timeout=timeout))
    try:
        await asyncio.shield(connecting)
    except asyncio.CancelledError:
        await asyncio.wait({connecting})
        await asyncio.shield(connection.close())
        raise
    except BaseException:
        await asyncio.shield(connection.close())
        raise


async def declare_topology(channel: AbstractChannel) -> None:
    """Declare every exchange and queue of the contract; safe to call from every process."""
    ingest = await channel.declare_exchange(INGEST_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    events = await channel.declare_queue(INGEST_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    await events.bind(ingest, routing_key=INGEST_BINDING)

    dlx = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    await dead.bind(dlx)

    commands = await channel.declare_exchange(COMMANDS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    for name in (RECONCILER_QUEUE, FREEZER_QUEUE):
        queue = await channel.declare_queue(
            name,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": COMMAND_DELIVERY_LIMIT,
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            },
        )
        await queue.bind(commands, routing_key=name)
