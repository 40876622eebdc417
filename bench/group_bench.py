"""What one capture group costs the gateway, by group size: the fixed part and the part per event.

    .venv/bin/python -m bench.group_bench [--sizes 1,4,16,64] [--groups 300]

Runs `IngestPipeline` groups of N single-event requests one after another in this process, against the
real Postgres, Redis and RabbitMQ (no HTTP, no other load), and prints this process's CPU per group
and per event, the wall time per group, and what Postgres and RabbitMQ spent per group. A straight
line through the sizes gives the fixed cost of a group (its round trips: BEGIN, capture insert, Redis
reservation, publish + confirm, COMMIT) and the cost per event; docs/performance.md reads them.

Uses the database `rk_group_bench`, the vhost `rk-group-bench` (both created, then dropped) and Redis
database 15 of the local server (flushed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import UTC, datetime

import uvloop

from bench import procstat
from bench.stores import create_vhost, delete_vhost, drop_database
from services.gateway.sync import CAPTURE_SESSION_SETTINGS
from shared.db import close_pool, connect, create_pool, keep_session_state
from shared.idempotency import compute_key
from shared.ingest import CaptureEvent, CaptureRequest, EventStatus, IngestPipeline
from shared.logging import configure_logging
from shared.migrate import migrate
from shared.publisher import EventPublisher
from shared.quota import non_billable_reason
from shared.redis_client import create_redis
from shared.redis_scripts import GateScripts
from shared.site_cache import SiteCache
from shared.sites import Site, create_site

DATABASE = "rk_group_bench"
DSN = f"postgresql://postgres@127.0.0.1:5432/{DATABASE}"
VHOST = "rk-group-bench"
AMQP = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
REDIS = "redis://127.0.0.1:6379/15"
WARM_UP_GROUPS = 20
SITE_PUBLIC_ID = "group-bench"


class Requests:
    """Single-event capture requests, each event new (a fresh URL)."""

    def __init__(self, site: Site) -> None:
        self._site = site
        self._sent = 0

    def group(self, size: int) -> list[CaptureRequest]:
        now = datetime.now(UTC)
        server_ms = int(now.timestamp() * 1000)
        out = []
        for _ in range(size):
            self._sent += 1
            event = {"s": SITE_PUBLIC_ID, "url": f"https://example.test/{self._sent}/{uuid.uuid4().hex}"}
            item = CaptureEvent(
                event=event,
                key=compute_key(self._site.id, event, server_ms),
                created_at=now,
                billing_reason=non_billable_reason(event),
            )
            out.append(
                CaptureRequest(self._site, [item], is_batch=False, client_ip="10.0.0.1", user_agent="bench")
            )
        return out


async def measure(sizes: list[int], groups: int) -> None:
    await migrate(DSN)
    conn = await connect(DSN)
    try:
        await create_site(conn, public_id=SITE_PUBLIC_ID, name="group bench", allowed_origins=["*"],
                          rate_limit_per_minute=None, monthly_limit=10**9)
    finally:
        await conn.close()
    pool = await create_pool(
        DSN, min_size=1, max_size=1, reset=keep_session_state, session_settings=CAPTURE_SESSION_SETTINGS
    )
    site_pool = await create_pool(DSN, min_size=1, max_size=1)
    redis = create_redis(REDIS)
    scripts = GateScripts(REDIS)
    publisher = EventPublisher(AMQP, timeout_ms=2000)
    await publisher.start()
    try:
        while not publisher.is_ready:
            await asyncio.sleep(0.05)
        site = await SiteCache(site_pool, ttl_s=600, default_monthly_limit=10**9).get(SITE_PUBLIC_ID)
        assert site is not None
        pipeline = IngestPipeline(pool, redis, scripts, publisher, max_concurrent_groups=1)
        requests = Requests(site)
        run_group = pipeline._capture_group  # noqa: SLF001 - one group at a time, without the batcher
        print("| requests per group | CPU µs per group | CPU µs per event | wall ms per group "
              "| Postgres µs per group | RabbitMQ µs per group |")
        print("|---|---|---|---|---|---|")
        for size in sizes:
            for _ in range(WARM_UP_GROUPS):
                await run_group(requests.group(size))
            batches = [requests.group(size) for _ in range(groups)]
            servers_0 = procstat.snapshot()
            cpu_0, wall_0 = time.process_time(), time.perf_counter()
            outcomes = [await run_group(batch) for batch in batches]
            cpu_s, wall_s = time.process_time() - cpu_0, time.perf_counter() - wall_0
            servers = _servers_us_per_group(servers_0, procstat.snapshot(), groups)
            for results in outcomes:  # every event of every group captured, or the figures mean nothing
                statuses = {r.events[0].status if not isinstance(r, Exception) else r for r in results}
                assert statuses == {EventStatus.QUEUED}, statuses
            print(f"| {size} | {1e6 * cpu_s / groups:,.0f} | {1e6 * cpu_s / groups / size:,.1f} "
                  f"| {1e3 * wall_s / groups:.2f} "
                  f"| {servers['postgres']:,.0f} | {servers['rabbitmq']:,.0f} |")
    finally:
        await publisher.close()
        await scripts.close()
        await redis.flushdb()
        await redis.aclose()
        await close_pool(pool)
        await close_pool(site_pool)


def _servers_us_per_group(start: procstat.Snapshot, end: procstat.Snapshot, groups: int) -> dict[str, float]:
    """Postgres (this database's backends and the cluster's own processes) and RabbitMQ CPU per group.

    From /proc tick counters (10 ms), so measure enough groups for a second or more of CPU."""
    classify = procstat.make_classifier(end.procs, {}, [DATABASE])
    percent = procstat.cpu_percent_by_group(start, end, classify)
    wall_us = 1e6 * (end.taken_at - start.taken_at)
    return {group: percent.get(group, 0.0) / 100 * wall_us / groups for group in ("postgres", "rabbitmq")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,4,16,64", help="requests per group, comma-separated")
    parser.add_argument("--groups", type=int, default=300, help="groups measured per size")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.groups < 1 or min(sizes) < 1:
        parser.error("--groups and every size must be >= 1")
    configure_logging("warning")
    drop_database(DATABASE)
    create_vhost(VHOST)
    try:
        uvloop.run(measure(sizes, args.groups))
    finally:
        delete_vhost(VHOST)
        drop_database(DATABASE)


if __name__ == "__main__":
    main()
