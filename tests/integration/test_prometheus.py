"""`GET /metrics` on the gateway and on a worker (SPEC §11): Prometheus text that parses, with the
named series, and scrape-time gauges that match what is really in Postgres and RabbitMQ."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from shared.amqp import RECONCILER_QUEUE
from shared.prom import QueueDepthProbe
from shared.settings import Settings
from shared.sites import create_site
from shared.worker import Worker
from tests.conftest import amqp_url_for, free_port, pg_dsn
from tests.support.gateway import gateway_client, wait_for_amqp

Client = TestClient[Any, Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    families = list(text_string_to_metric_families(text))
    samples: Samples = {}
    for family in families:
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return {f.name for f in families}, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: Client) -> tuple[set[str], Samples]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return parse(await response.text())


SPEC_SERIES = {
    "billing_ingest_allowed", "billing_ingest_duplicate", "billing_ingest_rejected_quota",
    "billing_ingest_rate_limited", "billing_ingest_overage", "billing_ingest_degraded",
    "billing_reconciliation_runs_ok", "billing_reconciliation_runs_failed",
    "billing_reconciliation_drift_sites_last1h", "revkernel_http_request_duration_seconds",
    "revkernel_publish_confirm_seconds", "revkernel_fallback_buffer_rows",
    "revkernel_fallback_oldest_pending_age_seconds", "revkernel_reconciliation_jobs",
    "revkernel_rabbitmq_queue_messages", "revkernel_metrics_source_up",
}


async def _fallback_row(db: asyncpg.Connection, site_id: uuid.UUID, status: str, age_s: int) -> None:
    await db.execute(
        """INSERT INTO ingest_fallback_buffer
               (site_id, idempotency_key, bucket_at, payload, routing_key, error_reason, status, created_at)
           VALUES ($1, $2, now(), '{}'::jsonb, 'event.x', 'broker_publish_failed', $3,
                   now() - make_interval(secs => $4))""",
        site_id, uuid.uuid4().hex, status, age_s,
    )


async def test_gateway_metrics_reflect_traffic_and_shared_state(
    settings: Settings, db: asyncpg.Connection
) -> None:
    site = await create_site(db, public_id="prom-site", allowed_origins=["*"], monthly_limit=100)
    await _fallback_row(db, site.id, "PENDING", 120)
    await _fallback_row(db, site.id, "PENDING", 5)
    await _fallback_row(db, site.id, "FAILED", 300)
    await _fallback_row(db, site.id, "RECOVERED", 900)
    for month, status in (("2026-01", "QUEUED"), ("2026-02", "QUEUED"), ("2026-03", "FAILED")):
        await db.execute(
            "INSERT INTO billing_reconciliation_jobs (site_id, year_month, status) VALUES ($1, $2, $3)",
            site.id, month, status,
        )
    async with gateway_client(settings) as client:
        await wait_for_amqp(client)
        _, before = await scrape(client)
        response = await client.post(
            "/api/sync", data=orjson.dumps({"s": "prom-site", "url": "https://example.com/a"}),
            headers={"Content-Type": "application/json"},
        )
        assert response.status == 200, await response.text()
        await client.get("/no/such/path/" + uuid.uuid4().hex)
        names, after = await scrape(client)

    assert names >= SPEC_SERIES, SPEC_SERIES - names
    sync_labels = {"process": "gateway", "route": "/api/sync", "method": "POST", "status": "200"}
    assert (
        value(after, "revkernel_http_request_duration_seconds_count", **sync_labels)
        - value(before, "revkernel_http_request_duration_seconds_count", **sync_labels)
    ) == 1
    unmatched = {"process": "gateway", "route": "unmatched", "method": "GET", "status": "404"}
    assert value(after, "revkernel_http_request_duration_seconds_count", **unmatched) >= 1
    assert not any("/no/such/path" in str(labels) for _, labels in after)
    assert value(after, "billing_ingest_allowed_total") - value(before, "billing_ingest_allowed_total") == 1
    assert (
        value(after, "revkernel_publish_confirm_seconds_count")
        - value(before, "revkernel_publish_confirm_seconds_count")
    ) == 1
    # Shared state, read at scrape time.
    assert value(after, "revkernel_rabbitmq_queue_messages", queue="ingest.events") == 1
    assert value(after, "revkernel_rabbitmq_queue_messages", queue="reconciler.commands") == 0
    assert value(after, "revkernel_fallback_buffer_rows", status="PENDING") == 2
    assert value(after, "revkernel_fallback_buffer_rows", status="FAILED") == 1
    assert value(after, "revkernel_fallback_buffer_rows", status="PROCESSING") == 0
    assert 120 <= value(after, "revkernel_fallback_oldest_pending_age_seconds") < 3600
    assert value(after, "revkernel_reconciliation_jobs", status="QUEUED") == 2
    assert value(after, "revkernel_reconciliation_jobs", status="FAILED") == 1
    assert value(after, "revkernel_reconciliation_jobs", status="COMPLETED") == 0
    assert value(after, "billing_reconciliation_drift_sites_last1h") == 0
    assert value(after, "revkernel_metrics_source_up", source="postgres") == 1
    assert value(after, "revkernel_metrics_source_up", source="rabbitmq") == 1


async def test_gateway_metrics_answer_with_every_dependency_down(settings: Settings) -> None:
    """Dead Postgres and dead RabbitMQ ports: the scrape still answers (bounded), says which source is
    down, and shows no stale numbers."""
    dead = settings.with_overrides(
        database_url=pg_dsn("revkernel", port=free_port()), amqp_url=amqp_url_for("x", port=free_port())
    )
    async with gateway_client(dead) as client:
        _, samples = await scrape(client)
    assert value(samples, "revkernel_metrics_source_up", source="postgres") == 0
    assert value(samples, "revkernel_metrics_source_up", source="rabbitmq") == 0
    assert not any(name == "revkernel_rabbitmq_queue_messages" for name, _ in samples)
    assert math.isnan(value(samples, "revkernel_fallback_buffer_rows", status="PENDING"))
    assert math.isnan(value(samples, "billing_reconciliation_drift_sites_last1h"))


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    worker = Worker(name="reconciler", settings=settings, command_queue=RECONCILER_QUEUE, http_port=0,
                    http_host="127.0.0.1")
    await worker.start()
    try:
        await worker.wait_amqp()
        yield worker
    finally:
        await worker.stop()


async def test_worker_serves_metrics_on_its_own_port(worker: Worker, db: asyncpg.Connection) -> None:
    site = await create_site(db, public_id="worker-prom")
    await _fallback_row(db, site.id, "PENDING", 10)
    url = f"http://127.0.0.1:{worker.http_port}"
    async with aiohttp.ClientSession() as session:
        await session.get(f"{url}/healthz")
        async with session.get(f"{url}/metrics") as response:
            assert response.status == 200
            names, samples = parse(await response.text())
    assert SPEC_SERIES - {"revkernel_publish_confirm_seconds"} <= names
    assert value(samples, "revkernel_fallback_buffer_rows", status="PENDING") == 1
    assert value(samples, "revkernel_rabbitmq_queue_messages", queue="ingest.events") == 0
    assert value(samples, "revkernel_metrics_source_up", source="rabbitmq") == 1
    health = {"process": "reconciler", "route": "/healthz", "method": "GET", "status": "200"}
    assert value(samples, "revkernel_http_request_duration_seconds_count", **health) >= 1


async def test_queue_probe_survives_a_missing_queue(worker: Worker, amqp_url: str) -> None:
    """A passive declare of a queue that does not exist closes the probe's channel; the probe reports
    the queues that exist and opens a new channel, and the worker's own channel is untouched."""
    probe = QueueDepthProbe(lambda: worker.connection, queues=["no-such-queue", "ingest.events", "nope-2"])
    try:
        assert await probe.depths() == {"ingest.events": 0}
        assert await probe.depths() == {"ingest.events": 0}
    finally:
        await probe.close()
    assert worker.broker_ready
