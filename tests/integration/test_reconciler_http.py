"""The reconciliation cron endpoints (SPEC §8) and the watchtower (§11) through a real gateway and a
real reconciler consuming RabbitMQ."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import pytest
import structlog
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from services.reconciler.main import Reconciler, ReconcilerConfig
from shared.amqp import RECONCILER_QUEUE
from shared.commands import CommandClient
from shared.months import add_months, current_year_month, month_first_day
from shared.settings import Settings
from tests.conftest import CRON_SECRET
from tests.integration.reconciler_support import add_rows, create_site, job
from tests.support.gateway import gateway_client, raw_request

CURRENT = current_year_month()
PREVIOUS = add_months(CURRENT, -1)
AUTH = {"Authorization": f"Bearer {CRON_SECRET}"}
ENDPOINTS = [
    ("GET", "/api/cron/reconcile-usage"),
    ("GET", "/api/cron/reconcile-usage/enqueue"),
    ("POST", "/api/cron/reconcile-usage/run"),
    ("POST", "/api/cron/reconcile-usage/backfill"),
    ("GET", "/api/cron/watchtower"),
]


@pytest.fixture
async def reconciler(settings: Settings) -> AsyncIterator[Reconciler]:
    """A reconciler consuming this test's vhost, without its own schedules (so counts are the command's)."""
    reconciler = Reconciler(settings, ReconcilerConfig(schedules=False, http_port=0))
    await reconciler.worker.start()
    await reconciler.worker.wait_amqp()
    yield reconciler
    await reconciler.worker.stop()


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    async with gateway_client(settings) as client:
        yield client


async def command_queue_depth(amqp_url: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(RECONCILER_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def call(
    client: TestClient[Any, Any], method: str, path: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    response = await client.request(method, path, **kwargs)
    body = await response.json()
    if response.status != 200:
        assert response.headers["x-opsmantik-error-code"] == body["error"]
    if "request_id" in body:
        assert body["request_id"] == response.headers["x-request-id"]
    return response.status, body


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_wrong_or_missing_bearer_is_401(
    gateway: TestClient[Any, Any], settings: Settings, method: str, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": CRON_SECRET}):
        status, body = await call(gateway, method, path, headers=headers)
        assert (status, body["ok"], body["error"]) == (401, False, "unauthorized")
    assert await command_queue_depth(settings.amqp_url) == 0


@pytest.mark.parametrize("path", ["/api/cron/reconcile-usage", "/api/cron/reconcile-usage/enqueue"])
async def test_head_on_a_job_endpoint_runs_nothing(
    gateway: TestClient[Any, Any], settings: Settings, path: str
) -> None:
    """HEAD must be safe: on these GET endpoints it would enqueue and run jobs; it answers 405."""
    response = await gateway.head(path, headers=AUTH)
    assert response.status == 405 and "GET" in response.headers["Allow"]
    assert await command_queue_depth(settings.amqp_url) == 0


@pytest.mark.parametrize(
    ("method", "path"), [*ENDPOINTS, ("GET", "/api/metrics"), ("POST", "/api/cron/invoice-freeze")]
)
async def test_authorization_bytes_that_are_not_utf8_are_401(
    gateway: TestClient[Any, Any], settings: Settings, method: str, path: str
) -> None:
    """Non-UTF-8 header bytes reach the handler as lone surrogates; encoding them for the comparison
    raised, and every authenticated endpoint answered 500."""
    assert gateway.server.port is not None
    status, body = await raw_request(gateway.server.port, method, path, b"Authorization: Bearer caf\xe9")
    assert (status, body["error"]) == (401, "unauthorized")
    assert await command_queue_depth(settings.amqp_url) == 0


async def test_cron_secret_unset_is_503(settings: Settings) -> None:
    async with gateway_client(settings.with_overrides(cron_secret=None)) as client:
        for method, path in ENDPOINTS:
            status, body = await call(client, method, path, headers=AUTH)
            assert (status, body["error"]) == (503, "cron_secret_unset")


async def test_enqueue_run_and_reconcile_usage_shapes(
    db: asyncpg.Connection, gateway: TestClient[Any, Any], reconciler: Reconciler
) -> None:
    a, b = await create_site(db), await create_site(db)
    await add_rows(db, a, CURRENT, 3)
    await add_rows(db, b, CURRENT, 5)

    status, body = await call(gateway, "GET", "/api/cron/reconcile-usage/enqueue", headers=AUTH)
    assert status == 200
    assert body.keys() == {"ok", "enqueued", "sites", "request_id"}
    assert (body["ok"], body["enqueued"], body["sites"]) == (True, 4, 2)

    status, body = await call(gateway, "POST", "/api/cron/reconcile-usage/run", headers=AUTH)
    assert status == 200
    assert body.keys() == {"ok", "processed", "completed", "failed", "request_id"}
    assert (body["processed"], body["completed"], body["failed"]) == (4, 4, 0)

    await add_rows(db, b, CURRENT, 2)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        status, body = await call(gateway, "GET", "/api/cron/reconcile-usage", headers=AUTH)
    assert status == 200
    # SPEC §11: one line per job, with the request_id of the request that ran it.
    job_lines = [line for line in logs if line["event"] == "BILLING_RECONCILE_OK"]
    assert len(job_lines) == 4 and {line.get("request_id") for line in job_lines} == {body["request_id"]}
    assert body.keys() == {"ok", "enqueued", "processed", "completed", "failed", "request_id"}
    assert (body["enqueued"], body["processed"], body["completed"], body["failed"]) == (4, 4, 4, 0)
    usage = await db.fetchval(
        "SELECT event_count FROM site_usage_monthly WHERE site_id = $1 AND year_month = $2", b, CURRENT
    )
    assert usage == 7


def backfill_cases(site_known: uuid.UUID) -> list[tuple[Any, str]]:
    return [
        ({"from": "2024-13", "to": "2024-12"}, "invalid_month"),
        ({"from": "24-01", "to": "2024-02"}, "invalid_month"),
        ({"to": "2024-02"}, "invalid_month"),
        ({"from": "2024-01"}, "invalid_month"),
        ({"from": 202401, "to": "2024-02"}, "invalid_month"),
        ({"from": "2024-05", "to": "2024-04"}, "invalid_range"),
        ({"from": "2023-01", "to": "2024-01"}, "range_too_large"),
        ({"from": "2024-01", "to": "2024-02", "site_id": str(uuid.uuid4())}, "unknown_site"),
        ({"from": "2024-01", "to": "2024-02", "site_id": "not-a-uuid"}, "invalid_site_id"),
        ({"from": "2024-01", "to": "2024-02", "site_id": 12}, "invalid_site_id"),
        (["2024-01", "2024-02"], "invalid_json"),
    ]


async def test_every_backfill_validation_case_is_400(
    db: asyncpg.Connection, gateway: TestClient[Any, Any], settings: Settings
) -> None:
    site = await create_site(db)
    cases: list[tuple[dict[str, Any], str]] = [({"json": body}, code) for body, code in backfill_cases(site)]
    cases += [({"data": b"{not json"}, "invalid_json"), ({"data": b""}, "invalid_json")]
    for kwargs, code in cases:
        status, body = await call(
            gateway, "POST", "/api/cron/reconcile-usage/backfill", headers=AUTH, **kwargs
        )
        assert (status, body["ok"], body["error"]) == (400, False, code), kwargs
        assert body["reason"] and body["request_id"]
    # Rejected in the gateway: nothing was sent to the reconciler.
    assert await command_queue_depth(settings.amqp_url) == 0
    # 12 months inclusive is the most allowed.
    reconciler = Reconciler(settings, ReconcilerConfig(schedules=False, http_port=0))
    await reconciler.worker.start()
    try:
        status, body = await call(
            gateway,
            "POST",
            "/api/cron/reconcile-usage/backfill",
            headers=AUTH,
            json={"from": "2023-02", "to": "2024-01", "site_id": str(site)},
        )
    finally:
        await reconciler.worker.stop()
    assert (status, body["enqueued"], body["months"], body["sites"]) == (200, 12, 12, 1)


async def test_the_worker_validates_backfill_again(
    db: asyncpg.Connection, settings: Settings, reconciler: Reconciler
) -> None:
    site = await create_site(db)
    client = CommandClient(settings.amqp_url, timeout_s=10)
    await client.start()
    try:
        for body, code in backfill_cases(site):
            if not isinstance(body, dict):
                continue
            reply = await client.call(RECONCILER_QUEUE, "backfill", body, request_id=uuid.uuid4().hex)
            assert (reply["ok"], reply["error"], reply["status"]) == (False, code, 400)
    finally:
        await client.close()


async def test_valid_backfill_enqueues_only_missing_jobs(
    db: asyncpg.Connection, gateway: TestClient[Any, Any], reconciler: Reconciler
) -> None:
    old = add_months(CURRENT, -3)
    await db.execute("SELECT ingest_idempotency_ensure_partitions($1::date, 3)", month_first_day(old))
    a, b, idle = await create_site(db), await create_site(db), await create_site(db)
    await add_rows(db, a, old, 2)
    await add_rows(db, b, PREVIOUS, 1)
    first, last = old, PREVIOUS  # three months
    status, body = await call(
        gateway, "POST", "/api/cron/reconcile-usage/backfill", headers=AUTH, json={"from": first, "to": last}
    )
    assert status == 200 and body.keys() == {"ok", "enqueued", "months", "sites", "request_id"}
    assert (body["enqueued"], body["months"], body["sites"]) == (6, 3, 2)
    assert await job(db, idle, old) is None
    status, body = await call(
        gateway, "POST", "/api/cron/reconcile-usage/backfill", headers=AUTH, json={"from": first, "to": last}
    )
    assert (status, body["enqueued"]) == (200, 0)
    status, body = await call(
        gateway,
        "POST",
        "/api/cron/reconcile-usage/backfill",
        headers=AUTH,
        json={"from": add_months(old, -1), "to": last, "site_id": str(idle)},
    )
    assert (status, body["enqueued"], body["months"], body["sites"]) == (200, 4, 4, 1)
    audit = await db.fetchval("SELECT count(*) FROM billing_audit_log WHERE action = 'reconcile_backfill'")
    assert audit == 3


async def test_no_reconciler_is_504_and_the_command_stays_queued(
    db: asyncpg.Connection, settings: Settings
) -> None:
    site = await create_site(db)
    await add_rows(db, site, CURRENT, 4)
    quick = settings.with_overrides(command_timeout_s=0.5)
    async with gateway_client(quick) as client:
        status, body = await call(client, "GET", "/api/cron/reconcile-usage/enqueue", headers=AUTH)
    assert status == 504
    assert body.keys() == {"ok", "error", "request_id"} and body["error"] == "worker_timeout"
    assert await command_queue_depth(settings.amqp_url) == 1
    assert await job(db, site, CURRENT) is None
    # A reconciler that comes later still executes it.
    handled = await Reconciler(settings, ReconcilerConfig(schedules=False, http_port=0)).worker.burst()
    assert handled == 1
    row = await job(db, site, CURRENT)
    assert row is not None and row["status"] == "QUEUED"
    assert await command_queue_depth(settings.amqp_url) == 0


async def test_watchtower_reports_each_check(db: asyncpg.Connection, gateway: TestClient[Any, Any]) -> None:
    status, body = await call(gateway, "GET", "/api/cron/watchtower", headers=AUTH)
    assert status == 200 and body["ok"] is True and body["status"] == "ok"
    assert body["checks"] == {
        "billingReconciliationDriftLast1h": {"status": "ok", "count": 0},
        "fallbackBacklog": {"status": "ok", "pending": 0, "failed": 0, "oldest_pending_age_s": None},
        "reconciliationJobsFailed": {"status": "ok", "count": 0},
        "defaultPartitionRows": {"status": "ok", "count": 0},
    }
    metrics = body["billing_metrics"]
    assert metrics["billing_reconciliation_drift_sites_last1h"] == 0 and metrics["generated_at"].endswith("Z")
    assert "billing_reconciliation_runs_ok_total" in metrics

    site = await create_site(db)
    await db.execute(
        "INSERT INTO billing_reconciliation_jobs (site_id, year_month, status, last_drift_pct) "
        "VALUES ($1, $2, 'COMPLETED', 0.5), ($1, $3, 'FAILED', NULL)",
        site,
        CURRENT,
        PREVIOUS,
    )
    await db.execute(
        "INSERT INTO ingest_fallback_buffer (site_id, idempotency_key, bucket_at, payload, routing_key, "
        "error_reason, status, created_at) VALUES "
        "($1, 'k1', now(), '{}', 'event.x', 'e', 'PENDING', now() - interval '10 minutes'), "
        "($1, 'k2', now(), '{}', 'event.x', 'e', 'FAILED', now())",
        site,
    )
    await add_rows(db, site, "2001-01", 2)  # no partition for that month: lands in DEFAULT
    status, body = await call(gateway, "GET", "/api/cron/watchtower", headers=AUTH)
    assert status == 200 and body["status"] == "degraded"
    checks = body["checks"]
    assert checks["billingReconciliationDriftLast1h"] == {"status": "degraded", "count": 1}
    backlog = checks["fallbackBacklog"]
    assert (backlog["status"], backlog["pending"], backlog["failed"]) == ("degraded", 1, 1)
    assert 590 < backlog["oldest_pending_age_s"] < 3600
    assert checks["reconciliationJobsFailed"] == {"status": "degraded", "count": 1}
    assert checks["defaultPartitionRows"] == {"status": "degraded", "count": 2}
    assert body["billing_metrics"]["billing_reconciliation_drift_sites_last1h"] == 1
