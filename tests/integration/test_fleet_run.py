"""`revkernel run` (SPEC §13): the whole fleet as one command. Its gateway captures, its reconciler and
freezer answer commands, SIGTERM stops all three with exit 0, and a child that dies stops the rest."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from shared.months import add_months
from shared.settings import Settings
from shared.sites import create_site
from tests.conftest import CRON_SECRET, REPO_ROOT, free_port, settings_env

AUTH = {"Authorization": f"Bearer {CRON_SECRET}"}


class Fleet:
    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.ports = {"gateway": free_port(), "reconciler": free_port(), "freezer": free_port()}
        self.env = {
            **settings_env(settings),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.ports["gateway"]),
            "RECONCILER_HTTP_PORT": str(self.ports["reconciler"]),
            "FREEZER_HTTP_PORT": str(self.ports["freezer"]),
        }
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, kind: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[kind]}{path}"

    async def start(self, http: aiohttp.ClientSession, timeout_s: float = 60) -> None:
        """Until every process kind answers /readyz 200 and the gateway has its broker."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "run"],
                env=self.env, cwd=REPO_ROOT, stdout=log, stderr=log,
            )
        deadline = time.monotonic() + timeout_s
        waiting = set(self.ports)
        while waiting and time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            for kind in list(waiting):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url(kind, "/readyz")) as response:
                        body = await response.json()
                        if response.status == 200 and (kind != "gateway" or body["checks"]["rabbitmq"]):
                            waiting.discard(kind)
            await asyncio.sleep(0.1)
        assert not waiting, f"not ready: {waiting}\n{self.log_path.read_text()[-3000:]}"

    def children(self) -> list[int]:
        assert self.process is not None
        found = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_run_serves_and_stops_the_whole_fleet_on_sigterm(
    settings: Settings, db: asyncpg.Connection, amqp_url: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    await create_site(db, public_id="demo", allowed_origins=["*"], monthly_limit=100)
    fleet = Fleet(settings, tmp_path / "fleet.log")
    try:
        await fleet.start(http)
        children = fleet.children()
        sent = {"s": "demo", "url": "https://x/1"}
        async with http.post(fleet.url("gateway", "/api/sync"), json=sent) as r:
            captured = (r.status, await r.json())
        async with http.post(fleet.url("gateway", "/api/cron/reconcile-usage/run"), headers=AUTH) as r:
            reconciled = (r.status, await r.json())
        closed = add_months(datetime.now(UTC).strftime("%Y-%m"), -1)
        async with http.post(
            fleet.url("gateway", "/api/cron/invoice-freeze"), headers=AUTH, json={"year_month": closed}
        ) as r:
            frozen = (r.status, await r.json())
        assert fleet.process is not None
        fleet.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(fleet.process.wait, 60)
    finally:
        fleet.stop()
    assert captured[0] == 200 and captured[1]["status"] == "queued"
    assert reconciled[0] == 200 and reconciled[1]["ok"] is True, reconciled  # the fleet's reconciler replied
    assert frozen[0] == 200 and frozen[1]["ok"] is True, frozen  # and its freezer
    assert len(children) == 3
    assert code == 0, (tmp_path / "fleet.log").read_text()[-3000:]
    assert not [pid for pid in children if alive(pid)]


async def test_run_stops_the_fleet_when_one_process_dies(
    settings: Settings, amqp_url: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fleet = Fleet(settings, tmp_path / "fleet.log")
    try:
        await fleet.start(http)
        children = fleet.children()
        reconciler = subprocess.run(
            ["pgrep", "-P", str(fleet.process.pid if fleet.process else 0), "-f", "services.cli reconciler"],
            capture_output=True, text=True, check=True,
        )
        victim = int(reconciler.stdout.split()[0])
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        assert fleet.process is not None
        code = await asyncio.to_thread(fleet.process.wait, 60)
    finally:
        fleet.stop()
    assert code != 0
    assert "reconciler exited with -9; stopping the fleet" in (tmp_path / "fleet.log").read_text()
    assert not [pid for pid in children if alive(pid)]
