"""Prometheus exposition for every process (`GET /metrics`, SPEC §11).

What is per process and what is fleet-wide:
- the SPEC §11 billing counters here (`billing_ingest_allowed_total`, ...) are this process's own
  increments since it started (Prometheus sums instances and handles restarts); the fleet totals that
  survive restarts are `/api/metrics` (shared.billing_counters, a Redis hash);
- request latency and publish-confirm latency are per process;
- the backlog, job, drift and queue-depth gauges describe shared state (Postgres, RabbitMQ) and are
  read at scrape time, with a short timeout, by whichever process is scraped: aggregate them with
  max(), not sum().
All series use the default registry, so the process/platform collectors of prometheus-client come too.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue, AbstractRobustChannel
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from shared.amqp import DEAD_LETTER_QUEUE, FREEZER_QUEUE, INGEST_QUEUE, RECONCILER_QUEUE
from shared.logging import get_logger
from shared.queries import query

log = get_logger("prom")

BILLING_COUNTER_NAMES = (
    "billing_ingest_allowed_total",
    "billing_ingest_duplicate_total",
    "billing_ingest_rejected_quota_total",
    "billing_ingest_rate_limited_total",
    "billing_ingest_overage_total",
    "billing_ingest_degraded_total",
    "billing_reconciliation_runs_ok_total",
    "billing_reconciliation_runs_failed_total",
)
# Queues whose depth is exported (the contract topology, SPEC §2).
OBSERVED_QUEUES = (INGEST_QUEUE, RECONCILER_QUEUE, FREEZER_QUEUE, DEAD_LETTER_QUEUE)
SCRAPE_SOURCE_TIMEOUT_S = 1.5
BACKLOG_STATUSES = ("PENDING", "PROCESSING", "FAILED")
JOB_STATUSES = ("QUEUED", "PROCESSING", "COMPLETED", "FAILED")

_BILLING = {
    name: Counter(name.removesuffix("_total"), f"SPEC §11 {name}, increments of this process")
    for name in BILLING_COUNTER_NAMES
}

HTTP_REQUEST_SECONDS = Histogram(
    "revkernel_http_request_duration_seconds",
    "HTTP request latency by route template and status",
    ["process", "route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
PUBLISH_CONFIRM_SECONDS = Histogram(
    "revkernel_publish_confirm_seconds",
    "Time from publish to the broker's confirm (confirmed messages only)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
PUBLISH_FAILURES = Counter(
    "revkernel_publish_failures", "Publishes the broker did not confirm, by reason", ["reason"]
)
DRIFT_SITES = Gauge(
    "billing_reconciliation_drift_sites_last1h",
    "Distinct sites with a COMPLETED reconciliation whose drift exceeded 1 % in the last hour",
)
FALLBACK_ROWS = Gauge(
    "revkernel_fallback_buffer_rows",
    "Rows of ingest_fallback_buffer not yet recovered, by status",
    ["status"],
)
FALLBACK_OLDEST_PENDING_S = Gauge(
    "revkernel_fallback_oldest_pending_age_seconds", "Age of the oldest PENDING fallback row (0 when none)"
)
RECONCILIATION_JOBS = Gauge(
    "revkernel_reconciliation_jobs", "billing_reconciliation_jobs rows by status", ["status"]
)
QUEUE_MESSAGES = Gauge(
    "revkernel_rabbitmq_queue_messages", "Ready messages in a contract queue (passive declare)", ["queue"]
)
SOURCE_UP = Gauge(
    "revkernel_metrics_source_up",
    "1 when the source of the scrape-time gauges answered within the timeout, else 0",
    ["source"],
)


def count_billing(name: str, amount: int = 1) -> None:
    """This process's share of a SPEC §11 counter (called by shared.billing_counters)."""
    _BILLING[name].inc(amount)


def observe_request(process: str, route: str, method: str, status: int, seconds: float) -> None:
    HTTP_REQUEST_SECONDS.labels(process, route, method, str(status)).observe(seconds)


def observe_publish_confirm(seconds: float) -> None:
    PUBLISH_CONFIRM_SECONDS.observe(seconds)


def count_publish_failure(reason: str) -> None:
    PUBLISH_FAILURES.labels(reason).inc()


def route_label(request: web.Request) -> str:
    """The route template (`/api/sync`), never the raw path: unknown paths must not grow the label set."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"
    return resource.canonical


# ------------------------------------------------------------------------------- scrape-time gauges


def _unknown_postgres_gauges() -> None:
    DRIFT_SITES.set(math.nan)
    FALLBACK_OLDEST_PENDING_S.set(math.nan)
    for status in BACKLOG_STATUSES:
        FALLBACK_ROWS.labels(status).set(math.nan)
    for status in JOB_STATUSES:
        RECONCILIATION_JOBS.labels(status).set(math.nan)


async def refresh_postgres_gauges(pool: asyncpg.Pool, timeout_s: float = SCRAPE_SOURCE_TIMEOUT_S) -> bool:
    """Backlog, job counts and drift from Postgres; NaN (unknown) when it does not answer in time."""

    async def read() -> None:
        async with pool.acquire(timeout=timeout_s) as conn:
            drift = await conn.fetchval(query("metrics_drift_sites_last1h"))
            backlog = {r["status"]: r for r in await conn.fetch(query("metrics_fallback_backlog"))}
            job_rows = await conn.fetch(query("metrics_reconciliation_jobs_by_status"))
        jobs = {r["status"]: r["job_count"] for r in job_rows}
        DRIFT_SITES.set(drift)
        for status in BACKLOG_STATUSES:
            FALLBACK_ROWS.labels(status).set(backlog[status]["row_count"] if status in backlog else 0)
        pending = backlog.get("PENDING")
        FALLBACK_OLDEST_PENDING_S.set(max(0.0, pending["oldest_age_s"]) if pending is not None else 0.0)
        for status in JOB_STATUSES:
            RECONCILIATION_JOBS.labels(status).set(jobs.get(status, 0))

    try:
        await asyncio.wait_for(read(), timeout=timeout_s)
    except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        log.warning("metrics_postgres_unavailable", error=str(exc) or type(exc).__name__)
        _unknown_postgres_gauges()
        SOURCE_UP.labels("postgres").set(0)
        return False
    SOURCE_UP.labels("postgres").set(1)
    return True


class QueueDepthProbe:
    """Queue depths by passive declare on a channel of its own (a passive declare of a missing queue
    closes its channel, which must never be the publisher's or the consumer's)."""

    def __init__(
        self, connection: Callable[[], AbstractConnection | None], queues: Sequence[str] = OBSERVED_QUEUES
    ) -> None:
        self._connection = connection
        self._queues = tuple(queues)
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def _open_channel(self) -> AbstractChannel:
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        connection = self._connection()
        if connection is None or connection.is_closed:
            raise ConnectionError("no broker connection")
        self._channel = await connection.channel(publisher_confirms=False)
        return self._channel

    async def depths(self) -> dict[str, int]:
        async with self._lock:
            channel = await self._open_channel()
            out: dict[str, int] = {}
            for name in self._queues:
                try:
                    queue = await _declare_passive(channel, name)
                except aio_pika.exceptions.ChannelClosed:
                    # The queue does not exist (yet): the channel is gone, open another next time.
                    self._channel = None
                    channel = await self._open_channel()
                    continue
                result = queue.declaration_result
                out[name] = int(result.message_count or 0)
            return out

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        self._channel = None


async def _declare_passive(channel: AbstractChannel, name: str) -> AbstractQueue:
    if isinstance(channel, AbstractRobustChannel):
        # Not remembered for re-declaration, and never served from the channel's cache of queues
        # (a cached queue would report the message count of its first declaration forever).
        return await channel.declare_queue(name, passive=True, robust=False)
    return await channel.declare_queue(name, passive=True)


async def refresh_queue_gauges(probe: QueueDepthProbe, timeout_s: float = SCRAPE_SOURCE_TIMEOUT_S) -> bool:
    try:
        depths = await asyncio.wait_for(probe.depths(), timeout=timeout_s)
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError, RuntimeError) as exc:
        log.warning("metrics_rabbitmq_unavailable", error=str(exc) or type(exc).__name__)
        QUEUE_MESSAGES.clear()
        SOURCE_UP.labels("rabbitmq").set(0)
        return False
    QUEUE_MESSAGES.clear()
    for name, count in depths.items():
        QUEUE_MESSAGES.labels(name).set(count)
    SOURCE_UP.labels("rabbitmq").set(1)
    return True


async def render_metrics(pool: asyncpg.Pool, probe: QueueDepthProbe) -> bytes:
    """Refresh the scrape-time gauges (both sources at once, each bounded) and render the registry."""
    await asyncio.gather(refresh_postgres_gauges(pool), refresh_queue_gauges(probe))
    return generate_latest()


def metrics_response(body: bytes) -> web.Response:
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
