"""Reconciler throughput: reconcile (site-months/s) and fallback recovery (buffer rows/s).

    .venv/bin/python -m bench.reconcile_bench [--sites 1000] [--rows 1000] [--buffer-rows 10000]

Uses the local Postgres and RabbitMQ with a throw-away database and vhost, and a private redis-server;
everything is removed at the end. Each figure is printed with its ratio to a baseline measured in the
same run: for reconcile, the bare COUNT query per site-month on one connection (the floor of the work);
for recovery, confirmed publishes of the same messages with no database work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from services.reconciler.recovery import RecoverySettings, outgoing_message, recover_batch
from shared.amqp import INGEST_QUEUE, connect_robust, declare_topology
from shared.db import create_pool
from shared.logging import configure_logging
from shared.migrate import apply_migrations, create_database_if_missing
from shared.months import current_year_month, month_start
from shared.publisher import EventPublisher
from shared.queries import query
from shared.quota import usage_key
from shared.reconciliation import JobSettings, enqueue_jobs, run_jobs
from shared.redis_client import create_redis

PG = "postgresql://postgres@127.0.0.1:5432"
AMQP = "amqp://guest:guest@127.0.0.1:5672"

GENERATE_ROWS = """
INSERT INTO ingest_idempotency (site_id, idempotency_key, idempotency_version, bucket_at, created_at,
                                expires_at, billing_state, billable)
SELECT s.id, s.public_id || '-' || g, 1, $1::timestamptz + g * interval '1 second',
       $1::timestamptz + g * interval '1 second',
       $1::timestamptz + g * interval '1 second' + interval '2160 hours',
       CASE WHEN g % 10 = 0 THEN 'OVERAGE'::billing_state ELSE 'ACCEPTED'::billing_state END, true
FROM sites s CROSS JOIN generate_series(1, $2::integer) AS g
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Figure:
    name: str
    units: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.units / self.seconds


def report(title: str, unit: str, baseline: Figure, figures: list[Figure]) -> None:
    print(f"\n{title}")
    for fig in [baseline, *figures]:
        ratio = fig.rate / baseline.rate
        print(
            f"  {fig.name:<46} {fig.units:>7} {unit} in {fig.seconds:7.2f} s = {fig.rate:9.0f} {unit}/s"
            f"  ({ratio:.2f}x baseline)"
        )


async def timed(name: str, units: int, work: Callable[[], Awaitable[object]]) -> Figure:
    started = time.perf_counter()
    await work()
    return Figure(name, units, time.perf_counter() - started)


async def bench_reconcile(pool: asyncpg.Pool, redis_url: str, sites: int, rows: int) -> None:
    month = current_year_month()
    t0 = time.perf_counter()
    await pool.execute(
        "INSERT INTO sites (public_id, name) SELECT 'bench-' || g, 'bench' FROM generate_series(1, $1) AS g",
        sites,
    )
    await pool.execute(GENERATE_ROWS, month_start(month), rows)
    await pool.execute("VACUUM ANALYZE ingest_idempotency")
    print(f"generated {sites} sites x {rows} rows in {time.perf_counter() - t0:.1f} s")
    site_ids = [r["id"] for r in await pool.fetch("SELECT id FROM sites ORDER BY id")]
    redis = create_redis(redis_url, timeout_s=2.0)

    async def drift_half() -> None:
        # Half the sites' counters 100 too high: those jobs take the lock, correct, reset stripes.
        async with redis.pipeline(transaction=False) as pipe:
            for i, site in enumerate(site_ids):
                pipe.set(usage_key(site, month), rows + (100 if i % 2 else 0))
            await pipe.execute()

    async def bare_counts() -> None:
        async with pool.acquire() as conn:
            for site in site_ids:
                for m in (month, "2000-01"):
                    await conn.fetchrow(query("reconcile_count_month"), site, m)

    baseline = await timed("bare COUNT per site-month, 1 connection", 2 * len(site_ids), bare_counts)
    figures = []
    for concurrency in (1, 4, 8):
        settings = JobSettings(concurrency=concurrency, run_limit=200)
        await drift_half()
        enqueued = await enqueue_jobs(pool, settings=settings)

        async def drain(settings: JobSettings = settings) -> None:
            while (await run_jobs(pool, redis, settings=settings)).processed:
                pass

        figures.append(
            await timed(f"run_jobs, concurrency {concurrency} (half drifted)", enqueued.enqueued, drain)
        )
    failed = await pool.fetchval(
        "SELECT count(*) FROM billing_reconciliation_jobs WHERE status <> 'COMPLETED'"
    )
    assert failed == 0, f"{failed} jobs not COMPLETED"
    enqueue = await timed("enqueue (1000 sites, EXISTS probes)", len(site_ids), lambda: enqueue_jobs(pool))
    report("reconcile throughput (site-months)", "site-months", baseline, figures)
    print(f"  enqueue of {len(site_ids)} active sites: {enqueue.seconds * 1000:.0f} ms")
    await redis.aclose()


async def bench_recovery(pool: asyncpg.Pool, amqp_url: str, n: int) -> None:
    site = await pool.fetchrow("SELECT id, public_id FROM sites ORDER BY id LIMIT 1")
    assert site is not None
    now = datetime.now(UTC).replace(microsecond=0)
    payloads = [
        {
            "s": site["public_id"],
            "url": f"https://bench.test/{i}",
            "ingest_id": str(uuid.uuid4()),
            "idempotency_key": f"rec-{i}-{uuid.uuid4().hex}",
            "site_id": str(site["id"]),
        }
        for i in range(n)
    ]
    buckets = [now - timedelta(milliseconds=i) for i in range(n)]
    await pool.execute(
        """INSERT INTO ingest_idempotency (site_id, idempotency_key, idempotency_version, bucket_at,
                                           created_at, expires_at, billing_state, billable)
           SELECT $1, k, 1, b, b, b + interval '2160 hours', 'DEGRADED_CAPTURE', true
           FROM unnest($2::text[], $3::timestamptz[]) AS t (k, b)""",
        site["id"],
        [p["idempotency_key"] for p in payloads],
        buckets,
    )
    publisher = EventPublisher(amqp_url, timeout_ms=5000)
    await publisher.start()
    await asyncio.wait_for(publisher.connected.wait(), 10)

    async def bare_publish() -> None:
        messages = [
            outgoing_message({"id": uuid.uuid4(), "payload": p, "routing_key": f"event.{site['public_id']}"})
            for p in payloads
        ]
        for i in range(0, n, 100):
            failures = await publisher.publish_many(messages[i : i + 100])
            assert not any(failures)

    baseline = await timed("confirmed publish only, 100 in flight", n, bare_publish)
    figures = []
    for batch in (100, 500):
        await pool.execute("DELETE FROM ingest_fallback_buffer")
        await pool.execute(
            "UPDATE ingest_idempotency SET billing_state = 'DEGRADED_CAPTURE' WHERE site_id = $1 "
            "AND billing_state = 'RECOVERED'",
            site["id"],
        )
        await pool.execute(
            """INSERT INTO ingest_fallback_buffer (site_id, idempotency_key, bucket_at, payload, routing_key,
                                                   error_reason)
               SELECT $1, k, b, p, $5, 'bench'
               FROM unnest($2::text[], $3::timestamptz[], $4::jsonb[]) AS t (k, b, p)""",
            site["id"],
            [p["idempotency_key"] for p in payloads],
            buckets,
            payloads,
            f"event.{site['public_id']}",
        )
        settings = RecoverySettings(batch_size=batch)

        async def drain(settings: RecoverySettings = settings) -> None:
            while (await recover_batch(pool, publisher, settings)).claimed:
                pass

        figures.append(await timed(f"recover_batch, batch {batch}", n, drain))
        left = await pool.fetchval("SELECT count(*) FROM ingest_fallback_buffer WHERE status <> 'RECOVERED'")
        assert left == 0
    await publisher.close()
    connection = await connect_robust(amqp_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue(INGEST_QUEUE, passive=True)
        depth = queue.declaration_result.message_count
    report("fallback recovery throughput", "rows", baseline, figures)
    print(f"  messages in {INGEST_QUEUE}: {depth} (= {n} x 3 runs)")


async def main(args: argparse.Namespace) -> None:
    configure_logging("warning")
    tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    database = f"rk_bench_reconcile_{tag}"
    vhost = f"rk-bench-{tag}"
    dsn = f"{PG}/{database}"
    port = free_port()
    redis_server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    amqp_url = f"{AMQP}/{vhost}"
    try:
        await create_database_if_missing(dsn)
        await apply_migrations(dsn)
        connection = await connect_robust(amqp_url)
        async with connection:
            await declare_topology(await connection.channel())
        pool = await create_pool(dsn, min_size=2, max_size=10, command_timeout=600)
        try:
            await bench_reconcile(pool, f"redis://127.0.0.1:{port}/0", args.sites, args.rows)
            await bench_recovery(pool, amqp_url, args.buffer_rows)
        finally:
            await pool.close()
    finally:
        admin = await asyncpg.connect(f"{PG}/postgres")
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False, capture_output=True)
        redis_server.terminate()
        redis_server.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--buffer-rows", type=int, default=10000)
    asyncio.run(main(parser.parse_args()))
