"""What the harness reads and prepares in Postgres and RabbitMQ: row counts, its vhost, queue drains."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage

from shared.db import connect
from shared.queries import parse_queries

SQL_FILE = Path(__file__).resolve().parent / "bench.sql"
EVENT_COUNT_HEADER = "x-event-count"


@cache
def sql(name: str) -> str:
    return parse_queries(SQL_FILE.read_text(encoding="utf-8"))[name]


async def connect_patiently(dsn: str, deadline_s: float = 60.0) -> asyncpg.Connection:
    """A connection, waiting while the shared cluster is out of connection slots (other engineers'
    test runs come and go) rather than failing the whole bench."""
    give_up = time.monotonic() + deadline_s
    while True:
        try:
            return await connect(dsn)
        except (asyncpg.TooManyConnectionsError, asyncpg.CannotConnectNowError):
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.5)


async def fetch_count(dsn: str, query_name: str) -> int:
    conn = await connect_patiently(dsn)
    try:
        value = await conn.fetchval(sql(query_name))
    finally:
        await conn.close()
    return int(value)


async def execute(dsn: str, query_name: str) -> None:
    conn = await connect_patiently(dsn)
    try:
        await conn.execute(sql(query_name))
    finally:
        await conn.close()


async def wait_stable(read: Callable[[], Awaitable[int]], *, interval_s: float = 0.25,
                      deadline_s: float = 30.0) -> int:
    """Poll `read` until two reads `interval_s` apart agree (the server has finished its writes)."""
    give_up = time.monotonic() + deadline_s
    previous = await read()
    while True:
        await asyncio.sleep(interval_s)
        current = await read()
        if current == previous:
            return current
        if time.monotonic() > give_up:
            raise TimeoutError(f"count still moving after {deadline_s} s ({previous} -> {current})")
        previous = current


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def create_vhost(vhost: str) -> None:
    """A fresh vhost (deleted first if a crashed run left it) that guest may use."""
    delete_vhost(vhost)
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


def delete_vhost(vhost: str) -> None:
    listed = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], check=True, capture_output=True,
                            text=True, timeout=60).stdout.split()
    if vhost in listed:
        rabbitmqctl("delete_vhost", vhost)


def drop_database(name: str) -> None:
    """DROP DATABASE … WITH (FORCE) through the Postgres client tool (no SQL assembled here)."""
    subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", "--force", name],
                   check=True, capture_output=True, timeout=120)


@dataclass(slots=True)
class Drained:
    messages: int = 0
    events: int = 0
    distinct_keys: int = 0
    malformed: int = 0  # no idempotency_key, or x-event-count disagreeing with the body


def count_message(body: bytes, headers: dict[str, object], keys: set[str]) -> tuple[int, bool]:
    """Events in one message and whether it is well formed; adds its idempotency keys to `keys`.

    A batch message has header x-event-count and body {"events": [...]}; any other message is one
    event object (SPEC §3).
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 1, False
    declared = headers.get(EVENT_COUNT_HEADER)
    if declared is None:
        events = [data]
    elif isinstance(data, dict) and isinstance(data.get("events"), list):
        events = data["events"]
    else:
        return int(str(declared)), False
    well_formed = declared is None or int(str(declared)) == len(events)
    for event in events:
        key = event.get("idempotency_key") if isinstance(event, dict) else None
        if isinstance(key, str):
            keys.add(key)
        else:
            well_formed = False
    return len(events), well_formed


async def drain_queue(amqp_url: str, queue_name: str, *, deadline_s: float = 120.0) -> Drained:
    """Consume (auto-ack) every message of `queue_name` and count events and distinct idempotency keys.

    Call it when no publisher is active: it stops once it has taken the count the broker reported and
    the queue reads empty.
    """
    drained, keys = Drained(), set[str]()
    progress = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        events, ok = count_message(message.body, dict(message.headers or {}), keys)
        drained.messages += 1
        drained.events += events
        drained.malformed += 0 if ok else 1
        progress.set()

    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        tag = await queue.consume(on_message, no_ack=True)
        give_up = time.monotonic() + deadline_s
        while True:
            progress.clear()
            declared = await channel.declare_queue(queue_name, passive=True)
            pending = declared.declaration_result.message_count
            try:
                # Deliveries already on the wire are not in the broker's count: done after 0.5 s of quiet.
                await asyncio.wait_for(progress.wait(), timeout=0.5 if pending == 0 else 2.0)
            except TimeoutError:
                if pending == 0:
                    break
            if time.monotonic() > give_up:
                raise TimeoutError(f"{queue_name}: {pending} messages still queued after {deadline_s} s")
        await queue.cancel(tag)
    finally:
        await connection.close()
    drained.distinct_keys = len(keys)
    return drained

