"""The gate's two lean clients against the libraries they replace, in one process, interleaved.

    .venv/bin/python -m bench.clients_bench [--seconds 5] [--in-flight 64]

- AMQP: confirmed persistent publishes to a quorum queue with N in flight, aio-pika (one confirm
  channel) vs shared/amqp_wire.ConfirmConnection: messages/s and client CPU per message. The broker's
  own CPU is read from /proc for the beam.smp process (the broker's cost per message).
- Redis: the rate-limit script call, redis-py (registered AsyncScript) vs shared/resp_wire, one call
  at a time and 10 at once: client CPU per call.

Each pair runs alternately three times, so drift on a shared machine hits both. Uses the vhost
`rk-clients-bench` (created, deleted at the end) and Redis database 15 of the local server (flushed);
`--vhost` and `--redis-url` choose others.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import uvloop

from bench.stores import create_vhost, delete_vhost
from shared.amqp import INGEST_EXCHANGE, declare_topology
from shared.amqp_wire import ConfirmConnection, OutgoingMessage
from shared.redis_client import create_redis
from shared.redis_scripts import GateScripts, script_source

AMQP = "amqp://guest:guest@127.0.0.1:5672"
REDIS = "redis://127.0.0.1:6379/15"
VHOST = "rk-clients-bench"
BODY = b'{"s":"site-pub-1","url":"https://example.test/page","ea":"page_view","sid":"0123456789"}' * 4


def broker_cpu_s() -> float:
    """CPU seconds of the RabbitMQ VM (beam.smp) so far; 0 when it cannot be read."""
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as comm:
                name = comm.read().strip()
        except OSError:
            continue
        if name.startswith("beam"):
            return (int(fields[11]) + int(fields[12])) / ticks
    return 0.0


async def confirmed_rate(publish_one: Callable[[], Awaitable[None]], seconds: float, in_flight: int) -> str:
    sent = 0
    stop = time.monotonic() + seconds

    async def sender() -> None:
        nonlocal sent
        while time.monotonic() < stop:
            await publish_one()
            sent += 1

    cpu, broker, wall = time.process_time(), broker_cpu_s(), time.monotonic()
    await asyncio.gather(*(sender() for _ in range(in_flight)))
    wall = time.monotonic() - wall
    cpu = time.process_time() - cpu
    broker = broker_cpu_s() - broker
    return (
        f"{sent / wall:8,.0f} msgs/s   client {cpu / sent * 1e6:5.0f} µs CPU/msg   "
        f"broker {broker / sent * 1e6:5.0f} µs CPU/msg"
    )


async def amqp_pair(url: str, seconds: float, in_flight: int) -> None:
    control = await aio_pika.connect(url)
    channel = await control.channel(publisher_confirms=True)
    await declare_topology(channel)
    exchange = await channel.get_exchange(INGEST_EXCHANGE)
    wire = await ConfirmConnection.open(url)

    async def via_aio_pika() -> None:
        message = aio_pika.Message(
            BODY, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
        )
        await exchange.publish(message, routing_key="event.bench", mandatory=True)

    async def via_wire() -> None:
        message = OutgoingMessage(BODY, "event.bench", uuid.uuid4().hex)
        [confirm] = wire.publish_many(INGEST_EXCHANGE, [message])
        await confirm

    try:
        for name, publish in (("aio-pika ", via_aio_pika), ("amqp_wire", via_wire)) * 3:
            print(f"AMQP  {name}  {in_flight} in flight: {await confirmed_rate(publish, seconds, in_flight)}")
            queue = await channel.get_queue("ingest.events")
            await queue.purge()
    finally:
        await wire.close()
        await control.close()


async def redis_pair(redis_url: str, calls: int) -> None:
    old_client = create_redis(redis_url)
    old_script = old_client.register_script(script_source("rate_limit"))
    scripts = GateScripts(redis_url)
    keys, args = ["rl:bench:203.0.113.9:1"], [1, 10**9, 120_000]

    async def via_redis_py() -> None:
        await old_script(keys=keys, args=args)

    async def via_wire() -> None:
        await scripts.run(scripts.rate_limit, keys, args)

    try:
        for name, call in (("redis-py ", via_redis_py), ("resp_wire", via_wire)) * 3:
            for _ in range(200):
                await call()
            cpu = time.process_time()
            for _ in range(calls):
                await call()
            alone = (time.process_time() - cpu) / calls
            cpu = time.process_time()
            for _ in range(calls // 10):
                await asyncio.gather(*(call() for _ in range(10)))
            together = (time.process_time() - cpu) / (calls // 10 * 10)
            print(
                f"Redis {name}  one at a time {alone * 1e6:4.0f} µs CPU/call   "
                f"10 at once {together * 1e6:4.0f} µs CPU/call"
            )
    finally:
        await old_client.flushdb()
        await old_client.aclose()
        await scripts.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--redis-calls", type=int, default=3000)
    parser.add_argument("--vhost", default=VHOST, help="created, and deleted at the end")
    parser.add_argument("--redis-url", default=REDIS, help="a database the bench may flush")
    options = parser.parse_args()
    create_vhost(options.vhost)
    try:
        await amqp_pair(f"{AMQP}/{options.vhost}", options.seconds, options.in_flight)
    finally:
        delete_vhost(options.vhost)
    await redis_pair(options.redis_url, options.redis_calls)


if __name__ == "__main__":
    uvloop.run(main())
