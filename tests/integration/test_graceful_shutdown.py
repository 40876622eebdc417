"""SIGTERM to a `revkernel gateway` under load (SPEC §13: drains in-flight work and exits 0): every
request that was answered 200 has its idempotency row, its message in `ingest.events` and its line in
the (batched) access log."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from shared.settings import Settings
from shared.sites import create_site
from tests.conftest import settings_env
from tests.support.gateway import drain_queue, published_events
from tests.support.gateway_process import GatewayProcess

CLIENTS = 24
SIGTERM_AFTER_OK = 150
MAX_REQUESTS_PER_CLIENT = 400
LOAD_DEADLINE_S = 60


class Load:
    """Concurrent senders; each request carries a unique tag in `el`, stored as the row's event_label."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.in_flight = 0
        self.answered: dict[str, tuple[int, dict[str, Any]]] = {}
        self.failed = 0
        self.enough = asyncio.Event()
        self.stopped = False

    async def sender(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + LOAD_DEADLINE_S
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() > deadline:
                return
            tag = uuid.uuid4().hex
            body = orjson.dumps({"s": "load", "url": f"https://example.com/{tag}", "el": tag})
            self.in_flight += 1
            try:
                async with session.post(
                    f"{self.url}/api/sync", data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    self.answered[tag] = (response.status, await response.json())
            except (aiohttp.ClientError, TimeoutError):
                # Refused or reset once the gateway stops accepting: this sender is done.
                self.failed += 1
                return
            finally:
                self.in_flight -= 1
            if sum(1 for status, _ in self.answered.values() if status == 200) >= SIGTERM_AFTER_OK:
                self.enough.set()
            if self.stopped and self.failed:
                return


async def test_sigterm_under_load_loses_no_accepted_event(
    settings: Settings,
    db: asyncpg.Connection,
    amqp_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await create_site(db, public_id="load", allowed_origins=["*"], monthly_limit=1_000_000,
                      rate_limit_per_minute=1_000_000)
    gateway = GatewayProcess(settings_env(settings), tmp_path / "gateway.log")
    await gateway.start()
    load = Load(gateway.url)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            senders = [asyncio.create_task(load.sender(session)) for _ in range(CLIENTS)]
            await asyncio.wait_for(load.enough.wait(), timeout=LOAD_DEADLINE_S)
            in_flight_at_sigterm = load.in_flight
            answered_before = len(load.answered)
            gateway.terminate()
            load.stopped = True
            await asyncio.gather(*senders)
        exit_code = await gateway.wait()
    finally:
        gateway.kill()

    ok = {tag: body for tag, (status, body) in load.answered.items() if status == 200}
    others = sorted({status for status, _ in load.answered.values() if status != 200})
    with capsys.disabled():
        print(
            f"\nSIGTERM with {in_flight_at_sigterm} requests in flight; {answered_before} answered before, "
            f"{len(load.answered) - answered_before} after; {len(ok)} got 200, other statuses {others}, "
            f"{load.failed} refused/reset"
        )
    assert exit_code == 0, gateway.log_tail()
    assert in_flight_at_sigterm > 0
    assert all(body["status"] == "queued" for body in ok.values())

    rows = await db.fetch("SELECT event_label, billable, billing_state FROM ingest_idempotency")
    by_tag = {r["event_label"]: r for r in rows}
    missing_rows = [tag for tag in ok if tag not in by_tag]
    assert missing_rows == [], f"{len(missing_rows)} answered 200 without a row"
    assert all(by_tag[tag]["billable"] and by_tag[tag]["billing_state"] == "ACCEPTED" for tag in ok)

    published = {e["el"]: e for e in published_events(await drain_queue(amqp_url))}
    missing_messages = [tag for tag in ok if tag not in published]
    assert missing_messages == [], f"{len(missing_messages)} answered 200 without a message"
    assert all(published[tag]["ingest_id"] == ok[tag]["ingest_id"] for tag in ok)
    # Nothing half-done either: every row that exists was published (no answer lost on the way out).
    assert set(by_tag) <= set(published)
    # The access log is written in batches: the lines still buffered at SIGTERM went out before the exit.
    logged_ok = sum(
        1
        for line in gateway.log_path.read_text(errors="replace").splitlines()
        if line.startswith("{") and '"event":"request"' in line and '"status":200' in line
    )
    assert len(ok) <= logged_ok <= len(ok) + load.failed, (logged_ok, len(ok), load.failed)


async def test_a_second_gateway_on_a_served_port_says_so_and_exits_1(
    settings: Settings, tmp_path: Path
) -> None:
    """A lone gateway binds without SO_REUSEPORT: a second one on its port (maybe on another database)
    used to share the port silently and take half of its requests."""
    first = await GatewayProcess(settings_env(settings), tmp_path / "first.log").start()
    try:
        command = [sys.executable, "-m", "services.cli", "gateway"]
        run = await asyncio.to_thread(subprocess.run, command, env=first.env, capture_output=True, timeout=60)
    finally:
        assert await first.stop() == 0
    assert run.returncode == 1
    [line] = [json.loads(x) for x in run.stderr.splitlines() if b"gateway_start_failed" in x]
    assert str(first.port) in line["error"] and "Traceback" not in run.stderr.decode()
