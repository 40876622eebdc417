"""Invoice freeze (SPEC §9, invariant 8) against real Postgres, Redis and RabbitMQ: the freezer worker
over AMQP commands, its schedule, `revkernel freeze`, and the snapshot's immutability."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from services.freezer.main import Freezer, FreezerConfig
from shared.amqp import FREEZER_QUEUE
from shared.commands import CommandClient
from shared.db import SERVICE_ROLE, create_pool
from shared.freeze import FreezeRefused, freeze_month
from shared.months import add_months, current_year_month, month_first_day, month_start
from shared.reconciliation import reconcile_month
from shared.settings import Settings
from tests.conftest import CRON_SECRET, free_port, settings_env
from tests.integration.reconciler_support import poll
from tests.support.gateway import gateway_client

MONTH = add_months(current_year_month(), -3)
REVKERNEL = str(Path(sys.executable).parent / "revkernel")
FAR_FUTURE = datetime.now(UTC) + timedelta(days=3650)  # rows of these tests never expire during them


async def add_rows(
    db: asyncpg.Connection,
    site_id: uuid.UUID,
    month: str,
    count: int,
    *,
    state: str = "ACCEPTED",
    billable: bool = True,
    day: int = 1,
) -> None:
    start = month_start(month) + timedelta(days=day - 1, hours=1)
    await db.execute(
        """INSERT INTO ingest_idempotency (site_id, idempotency_key, bucket_at, created_at, expires_at,
                                           billing_state, billable, billing_reason)
           SELECT $1, 'k-' || $2 || '-' || g, $3::timestamptz + g * interval '1 ms',
                  $3::timestamptz + g * interval '1 ms', $4,
                  $5::billing_state, $6, CASE WHEN $6 THEN NULL ELSE 'rejected_quota' END
           FROM generate_series(1, $7::int) AS g""",
        site_id,
        uuid.uuid4().hex,
        start,
        FAR_FUTURE,
        state,
        billable,
        count,
    )


@dataclass
class Month:
    sites: dict[str, uuid.UUID]


@pytest.fixture
async def month_rows(db: asyncpg.Connection) -> Month:
    """Three sites active in MONTH (with stale usage rows), one active only the month after, one idle."""
    for m in (MONTH, add_months(MONTH, 1)):
        await db.execute("SELECT ingest_idempotency_ensure_partitions($1::date, 1)", month_first_day(m))
    sites = {
        name: await db.fetchval("INSERT INTO sites (public_id) VALUES ($1) RETURNING id", name)
        for name in ("alpha", "beta", "gamma", "later", "idle")
    }
    await add_rows(db, sites["alpha"], MONTH, 7)
    await add_rows(db, sites["alpha"], MONTH, 3, state="OVERAGE", day=20)
    await add_rows(db, sites["alpha"], MONTH, 4, billable=False, day=25)  # rejected: not billable
    await add_rows(db, sites["alpha"], MONTH, 2, state="DEGRADED_CAPTURE", day=28)
    await add_rows(db, sites["alpha"], MONTH, 1, state="RECOVERED", day=28)
    await add_rows(db, sites["beta"], MONTH, 1)
    await add_rows(db, sites["gamma"], MONTH, 2, billable=False)  # rows, none billable: a zero invoice
    await add_rows(db, sites["later"], add_months(MONTH, 1), 5)
    # Stale usage (as if the reconciler last ran long ago): the freeze must not trust it.
    for name, stale in (("alpha", 999), ("beta", 0)):
        await db.execute(
            "INSERT INTO site_usage_monthly (site_id, year_month, event_count, overage_count)"
            " VALUES ($1, $2, $3, 5)",
            sites[name],
            MONTH,
            stale,
        )
    return Month(sites)


async def truth(db: asyncpg.Connection, site_id: uuid.UUID, month: str) -> tuple[int, int]:
    row = await db.fetchrow(
        """SELECT count(*) FILTER (WHERE billable) AS events,
                  count(*) FILTER (WHERE billable AND billing_state = 'OVERAGE') AS overage
           FROM ingest_idempotency WHERE site_id = $1 AND year_month = $2""",
        site_id,
        month,
    )
    assert row is not None
    return row["events"], row["overage"]


def independent_hash(site_id: uuid.UUID, month: str, events: int, overage: int, commit: str) -> str:
    return hashlib.sha256(f"{site_id}:{month}:{events}:{overage}:{commit}".encode()).hexdigest()


@pytest.fixture
async def freezer(settings: Settings) -> AsyncIterator[Freezer]:
    """The freezer worker, in this process, consuming freezer.commands of the test's vhost."""
    worker = Freezer(
        settings,
        # Only the month due by now at start-up: MONTH (3 months back) is left to each test's command.
        FreezerConfig(
            http_port=0, freeze_check_interval_s=3600, retention_interval_s=3600, drain_timeout_s=5,
            freeze_catch_up_months=1,
        ),
    )
    await worker.worker.start()
    await worker.worker.wait_amqp()
    await poll(lambda: _true(worker.worker.consumer.consuming))
    yield worker
    await worker.worker.stop()


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
async def commands(settings: Settings) -> AsyncIterator[CommandClient]:
    client = CommandClient(settings.amqp_url, timeout_s=settings.command_timeout_s)
    await client.start()
    yield client
    await client.close()


async def test_freeze_counts_from_the_source_of_truth_and_hashes_with_the_commit(
    db: asyncpg.Connection, month_rows: Month, freezer: Freezer, commands: CommandClient
) -> None:
    with capture_logs() as logs:
        reply = await commands.call(FREEZER_QUEUE, "freeze", {"year_month": MONTH}, request_id="req-freeze-1")
    assert reply == {"ok": True, "year_month": MONTH, "inserted": 3, "skipped": 0, "total_sites": 3}

    snapshots = {
        r["site_id"]: r for r in await db.fetch("SELECT * FROM invoice_snapshot WHERE year_month = $1", MONTH)
    }
    sites = month_rows.sites
    assert set(snapshots) == {sites["alpha"], sites["beta"], sites["gamma"]}
    expected = {"alpha": (13, 3), "beta": (1, 0), "gamma": (0, 0)}
    for name, counts in expected.items():
        site_id = sites[name]
        assert await truth(db, site_id, MONTH) == counts  # the fixture is what we think it is
        snap = snapshots[site_id]
        assert (snap["event_count"], snap["overage_count"]) == counts, name
        assert snap["commit_sha"] == "testsha"
        assert snap["snapshot_hash"] == independent_hash(site_id, MONTH, *counts, "testsha")
        assert snap["generated_by"] == freezer.config.worker_id
        # Usage was reconciled first, stale values replaced.
        usage = await db.fetchrow(
            "SELECT event_count, overage_count FROM site_usage_monthly"
            " WHERE site_id = $1 AND year_month = $2",
            site_id,
            MONTH,
        )
        assert usage is not None and (usage["event_count"], usage["overage_count"]) == counts, name

    audit = await db.fetch("SELECT * FROM billing_audit_log WHERE action = 'invoice_freeze'")
    assert len(audit) == 1
    assert audit[0]["year_month"] == MONTH and audit[0]["request_id"] == "req-freeze-1"
    assert audit[0]["details"]["inserted"] == 3 and audit[0]["details"]["commit_sha"] == "testsha"
    [line] = [e for e in logs if e["event"] == "INVOICE_FREEZE_COMPLETE"]
    assert (line["year_month"], line["inserted"], line["skipped"], line["total_sites"]) == (MONTH, 3, 0, 3)


async def test_second_freeze_inserts_nothing_and_keeps_the_first_snapshot(
    db: asyncpg.Connection, month_rows: Month, freezer: Freezer, commands: CommandClient
) -> None:
    first = await commands.call(FREEZER_QUEUE, "freeze", {"year_month": MONTH}, request_id="r1")
    before = await db.fetch("SELECT * FROM invoice_snapshot ORDER BY site_id")
    # A late row arrives for a frozen site: the snapshot stays what was frozen.
    await add_rows(db, month_rows.sites["beta"], MONTH, 4, day=3)
    second = await commands.call(FREEZER_QUEUE, "freeze", {"year_month": MONTH}, request_id="r2")
    assert first["inserted"] == 3
    assert second == {"ok": True, "year_month": MONTH, "inserted": 0, "skipped": 3, "total_sites": 3}
    assert await db.fetch("SELECT * FROM invoice_snapshot ORDER BY site_id") == before
    assert await db.fetchval("SELECT count(*) FROM billing_audit_log WHERE action = 'invoice_freeze'") == 2


@pytest.mark.parametrize(
    ("month", "code"),
    [
        (current_year_month(), "month_not_closed"),
        (add_months(current_year_month(), 1), "month_not_closed"),
        ("2026-13", "invalid_year_month"),
        (202601, "invalid_year_month"),
    ],
)
async def test_worker_rejects_the_current_future_or_malformed_month(
    db: asyncpg.Connection,
    month_rows: Month,
    freezer: Freezer,
    commands: CommandClient,
    month: object,
    code: str,
) -> None:
    reply = await commands.call(FREEZER_QUEUE, "freeze", {"year_month": month}, request_id="bad")
    assert reply["ok"] is False and reply["error"] == code and reply["status"] == 400
    assert await db.fetchval("SELECT count(*) FROM invoice_snapshot") == 0


async def test_freeze_month_refuses_the_current_month_directly(database_url: str, month_rows: Month) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        with pytest.raises(FreezeRefused):
            await freeze_month(pool, current_year_month(), commit_sha="x", generated_by="t")
    finally:
        await pool.close()


async def test_snapshot_written_by_the_freeze_is_immutable(
    db: asyncpg.Connection, database_url: str, month_rows: Month
) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=4)
    try:
        result = await freeze_month(pool, MONTH, commit_sha="abc", generated_by="test")
    finally:
        await pool.close()
    assert result.inserted == 3
    alpha = month_rows.sites["alpha"]
    for role in (None, SERVICE_ROLE):
        if role:
            await db.execute(f"SET ROLE {role}")
        for sql in (
            "UPDATE invoice_snapshot SET event_count = 0 WHERE site_id = $1",
            "DELETE FROM invoice_snapshot WHERE site_id = $1",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await db.execute(sql, alpha)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute("TRUNCATE invoice_snapshot")
        await db.execute("RESET ROLE")
    snap = await db.fetchrow(
        "SELECT event_count, snapshot_hash FROM invoice_snapshot WHERE site_id = $1", alpha
    )
    assert snap is not None
    assert (snap["event_count"], snap["snapshot_hash"]) == (13, independent_hash(alpha, MONTH, 13, 3, "abc"))


async def test_schedule_freezes_the_closed_month_once_its_grace_has_passed(
    db: asyncpg.Connection, month_rows: Month, freezer: Freezer
) -> None:
    next_month = month_start(add_months(MONTH, 1))
    # 00:05 on the 1st: the month that just ended is not due yet (events may still be committing).
    await freezer.freeze_schedule(now=next_month + timedelta(minutes=5))
    assert await db.fetchval("SELECT count(*) FROM invoice_snapshot WHERE year_month = $1", MONTH) == 0
    # 00:11: due, and frozen.
    await freezer.freeze_schedule(now=next_month + timedelta(minutes=11))
    assert await db.fetchval("SELECT count(*) FROM invoice_snapshot WHERE year_month = $1", MONTH) == 3
    audit = await db.fetchrow("SELECT * FROM billing_audit_log WHERE action = 'invoice_freeze'")
    assert audit is not None and audit["details"]["trigger"] == "schedule"
    # Checked again at the next tick: already frozen, nothing more is written.
    await freezer.freeze_schedule(now=next_month + timedelta(minutes=12))
    assert await db.fetchval("SELECT count(*) FROM billing_audit_log WHERE action = 'invoice_freeze'") == 1


async def test_freezer_freezes_every_month_left_unfrozen_at_start_up(
    db: asyncpg.Connection, settings: Settings
) -> None:
    """A freezer that was down for months freezes each closed month it missed, not just the last."""
    from shared.freeze import scheduled_freeze_month

    due = scheduled_freeze_month(datetime.now(UTC))
    missed = add_months(due, -3)
    site = await db.fetchval("INSERT INTO sites (public_id) VALUES ('startup') RETURNING id")
    for month, count in ((due, 6), (missed, 4)):
        await db.execute("SELECT ingest_idempotency_ensure_partitions($1::date, 1)", month_first_day(month))
        await add_rows(db, site, month, count, day=2)
    worker = Freezer(
        settings, FreezerConfig(http_port=0, freeze_check_interval_s=3600, retention_interval_s=3600)
    )
    await worker.worker.start()
    try:
        async def both_snapshots() -> list[asyncpg.Record] | None:
            rows = await db.fetch(
                "SELECT * FROM invoice_snapshot WHERE site_id = $1 AND year_month = ANY ($2::text[])",
                site, [due, missed],
            )
            return rows if len(rows) == 2 else None

        snaps = await poll(both_snapshots)
    finally:
        await worker.worker.stop()
    by_month = {snap["year_month"]: snap for snap in snaps}
    for month, count in ((due, 6), (missed, 4)):
        snap = by_month[month]
        assert (snap["event_count"], snap["overage_count"]) == (count, 0)
        assert snap["snapshot_hash"] == independent_hash(site, month, count, 0, "testsha")
    frozen = await db.fetch(
        "SELECT year_month FROM billing_audit_log WHERE action = 'invoice_freeze' ORDER BY id"
    )
    assert [r["year_month"] for r in frozen] == [missed, due]  # oldest first


def test_revkernel_freeze_cli_runs_directly(settings: Settings, month_rows: Month) -> None:
    env = settings_env(settings)
    run = subprocess.run(
        [REVKERNEL, "freeze", "--month", MONTH],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    body = orjson.loads(run.stdout)
    assert {k: body[k] for k in ("ok", "year_month", "inserted", "skipped", "total_sites")} == {
        "ok": True,
        "year_month": MONTH,
        "inserted": 3,
        "skipped": 0,
        "total_sites": 3,
    }
    again = subprocess.run(
        [REVKERNEL, "freeze", "--month", MONTH],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert orjson.loads(again.stdout)["skipped"] == 3
    refused = subprocess.run(
        [REVKERNEL, "freeze", "--month", current_year_month()],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert refused.returncode == 2 and b"month_not_closed" in refused.stderr


# ------------------------------------------------------------------------------------ HTTP endpoint

FREEZE_PATH = "/api/cron/invoice-freeze"
CRON = {"Authorization": f"Bearer {CRON_SECRET}"}


async def test_http_freeze_dispatches_to_the_freezer_and_answers_its_counts(
    settings: Settings, db: asyncpg.Connection, month_rows: Month, freezer: Freezer
) -> None:
    async with gateway_client(settings) as client:
        response = await client.post(FREEZE_PATH, json={"year_month": MONTH}, headers=CRON)
        body = await response.json()
        assert response.status == 200, body
        assert body == {
            "ok": True,
            "year_month": MONTH,
            "inserted": 3,
            "skipped": 0,
            "total_sites": 3,
            "request_id": response.headers["x-request-id"],
        }
        again = await (await client.post(FREEZE_PATH, json={"year_month": MONTH}, headers=CRON)).json()
        assert (again["inserted"], again["skipped"], again["total_sites"]) == (0, 3, 3)
        # No body: the previous UTC month (nothing active there in this test).
        default = await client.post(FREEZE_PATH, headers=CRON)
        assert default.status == 200
        assert (await default.json())["year_month"] == add_months(current_year_month(), -1)
    audit = await db.fetchval(
        "SELECT request_id FROM billing_audit_log"
        " WHERE action = 'invoice_freeze' AND year_month = $1 ORDER BY id",
        MONTH,
    )
    assert audit == body["request_id"]


async def test_http_freeze_refuses_bad_current_and_future_months_and_bad_credentials(
    settings: Settings, db: asyncpg.Connection, month_rows: Month
) -> None:
    """Validated in the gateway: no freezer runs here, so any dispatch would be a 504, not these."""
    cases: list[tuple[object, dict[str, str], int, str]] = [
        ({"year_month": current_year_month()}, CRON, 400, "month_not_closed"),
        ({"year_month": add_months(current_year_month(), 1)}, CRON, 400, "month_not_closed"),
        ({"year_month": add_months(current_year_month(), 25)}, CRON, 400, "month_not_closed"),
        ({"year_month": "2026-1"}, CRON, 400, "invalid_year_month"),
        ({"year_month": 202601}, CRON, 400, "invalid_year_month"),
        ({"year_month": "2026-08\n"}, CRON, 400, "invalid_year_month"),
        ([MONTH], CRON, 400, "invalid_json"),
        (b"{not json", CRON, 400, "invalid_json"),
        ({"year_month": MONTH}, {}, 401, "unauthorized"),
        ({"year_month": MONTH}, {"Authorization": "Bearer wrong-secret"}, 401, "unauthorized"),
        ({"year_month": MONTH}, {"Authorization": CRON_SECRET}, 401, "unauthorized"),
    ]
    async with gateway_client(settings) as client:
        for payload, headers, status, code in cases:
            if isinstance(payload, bytes):
                response = await client.post(FREEZE_PATH, data=payload, headers=headers)
            else:
                response = await client.post(FREEZE_PATH, json=payload, headers=headers)
            body = await response.json()
            assert (response.status, body["error"]) == (status, code), (payload, headers, body)
            assert response.headers["x-opsmantik-error-code"] == code
    async with gateway_client(settings.with_overrides(cron_secret=None)) as client:
        response = await client.post(FREEZE_PATH, json={"year_month": MONTH}, headers=CRON)
        assert response.status == 503
    assert await db.fetchval("SELECT count(*) FROM invoice_snapshot") == 0


async def test_http_freeze_without_a_freezer_is_504_and_the_command_still_runs_later(
    settings: Settings, db: asyncpg.Connection, month_rows: Month
) -> None:
    quick = settings.with_overrides(command_timeout_s=1.0)
    async with gateway_client(quick) as client:
        response = await client.post(FREEZE_PATH, json={"year_month": MONTH}, headers=CRON)
        body = await response.json()
    assert (response.status, body["error"], body["request_id"]) == (
        504,
        "worker_timeout",
        response.headers["x-request-id"],
    )
    assert await db.fetchval("SELECT count(*) FROM invoice_snapshot") == 0
    # A freezer that comes up later finds the command queued and runs it (drain-once mode).
    freezer = Freezer(settings, FreezerConfig(http_port=0))
    handled = await freezer.worker.burst()
    assert handled == 1
    assert await db.fetchval("SELECT count(*) FROM invoice_snapshot WHERE year_month = $1", MONTH) == 3
    requests = {
        r[0]
        for r in await db.fetch(
            "SELECT request_id FROM billing_audit_log WHERE action = 'invoice_freeze' AND year_month = $1",
            MONTH,
        )
    }
    assert body["request_id"] in requests


async def test_freeze_counts_by_the_reconcilers_rule(
    db: asyncpg.Connection, database_url: str, redis_client: aioredis.Redis, month_rows: Month
) -> None:
    """The freeze reconciles set-based; the reconciler one site at a time. They must never disagree."""
    pool = await create_pool(database_url, min_size=1, max_size=4)
    try:
        await freeze_month(pool, MONTH, commit_sha="c", generated_by="t", chunk_sites=2)
        for name in ("alpha", "beta", "gamma"):
            site_id = month_rows.sites[name]
            reconciled = await reconcile_month(pool, redis_client, site_id, MONTH)
            snap = await db.fetchrow(
                "SELECT event_count, overage_count FROM invoice_snapshot WHERE site_id = $1", site_id
            )
            assert snap is not None
            assert (snap["event_count"], snap["overage_count"]) == (
                reconciled.event_count,
                reconciled.overage_count,
            ), name
    finally:
        await pool.close()


async def test_freeze_waits_for_a_capture_of_the_month_still_in_flight(
    db: asyncpg.Connection, database_url: str, month_rows: Month
) -> None:
    """A capture holds its (site, month) quota lock SHARED until its rows commit. A freeze just after
    midnight must wait for it, not snapshot the month without the row that commits a moment later."""
    beta = month_rows.sites["beta"]
    capture = await asyncpg.connect(database_url)
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        in_flight = capture.transaction()
        await in_flight.start()
        await capture.execute("SELECT pg_advisory_xact_lock_shared(quota_lock_key($1, $2))", beta, MONTH)
        await add_rows(capture, beta, MONTH, 2, day=28)

        freeze = asyncio.create_task(freeze_month(pool, MONTH, commit_sha="c", generated_by="t"))

        async def freeze_waits_or_ended() -> bool:
            waiting = await db.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            return freeze.done() or waiting > 0

        await poll(freeze_waits_or_ended)
        await in_flight.commit()
        result = await asyncio.wait_for(freeze, 30)
    finally:
        await capture.close()
        await pool.close()
    assert result.inserted == 3
    snap = await db.fetchrow("SELECT event_count FROM invoice_snapshot WHERE site_id = $1", beta)
    assert snap is not None and snap["event_count"] == 1 + 2 == (await truth(db, beta, MONTH))[0]


async def test_revkernel_freezer_process_serves_commands_health_and_stops_on_sigterm(
    settings: Settings, db: asyncpg.Connection, month_rows: Month, commands: CommandClient
) -> None:
    port = free_port()
    env = {**settings_env(settings), "FREEZER_HTTP_PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        REVKERNEL, "freezer", "--freeze-catch-up-months", "1",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await poll(ready)
            reply = await commands.call(FREEZER_QUEUE, "freeze", {"year_month": MONTH}, request_id="proc")
            assert (reply["ok"], reply["inserted"], reply["total_sites"]) == (True, 3, 3)
            retention = await commands.call(FREEZER_QUEUE, "retention", {}, request_id="proc-retention")
            assert retention["ok"] is True and "dropped_partitions" in retention
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 0, stderr[-2000:]
        assert b"INVOICE_FREEZE_COMPLETE" in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert await db.fetchval("SELECT count(*) FROM invoice_snapshot WHERE year_month = $1", MONTH) == 3
