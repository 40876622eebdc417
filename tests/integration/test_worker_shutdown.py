"""A `revkernel freezer` process stopped in the middle of a command (SPEC §2, §13): SIGTERM drains the
command in hand, replies and exits 0; a crash (SIGKILL) leaves the unacked command to the next freezer,
which answers the caller that is still waiting. The command is held mid-way for real: the test owns the
fleet-wide freeze lock of the month, so the freezer blocks inside `freeze_month`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from shared.amqp import FREEZER_QUEUE
from shared.commands import CommandClient
from shared.db import connect
from shared.publisher import EventPublisher
from shared.queries import query
from shared.settings import Settings
from tests.conftest import AMQP_PORT, free_port, settings_env

MONTH = "2026-01"


class FreezerProcess:
    def __init__(self, settings: Settings, log: Path) -> None:
        self.port = free_port()
        self.env = {**settings_env(settings), "FREEZER_HTTP_PORT": str(self.port)}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> FreezerProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "freezer"], env=self.env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as response:
                        if response.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("freezer never became ready")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[CommandClient]:
    client = CommandClient(settings.amqp_url, timeout_s=30)
    await client.start()
    yield client
    await client.close()


async def wait_until_blocked_on_freeze_lock(db: asyncpg.Connection, timeout_s: float = 20) -> None:
    """Until another session waits for an advisory lock (the freezer, inside the command)."""
    deadline = time.monotonic() + timeout_s
    while not await db.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    ):
        if time.monotonic() > deadline:
            raise AssertionError("the freezer never reached the freeze lock")
        await asyncio.sleep(0.02)


async def wait_for_log_line(path: Path, text: str, timeout_s: float = 20) -> None:
    """Until the process's log file holds `text` (e.g. the line a signal handler writes)."""
    deadline = time.monotonic() + timeout_s
    while text not in await asyncio.to_thread(path.read_text, errors="replace"):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text} never appeared in {path.name}")
        await asyncio.sleep(0.02)


async def freeze_runs(db: asyncpg.Connection, request_id: str) -> int:
    """Audit rows of freeze runs made for this command (one per run that completed)."""
    return int(await db.fetchval(
        "SELECT count(*) FROM billing_audit_log WHERE year_month = $1 AND request_id = $2", MONTH, request_id
    ))


async def test_sigterm_mid_command_finishes_it_and_exits_0(
    settings: Settings, db: asyncpg.Connection, client: CommandClient, tmp_path: Path
) -> None:
    freezer = await FreezerProcess(settings, tmp_path / "freezer.log").start()
    holder = await connect(settings.database_url)
    try:
        await holder.fetchval(query("freeze_lock_month"), MONTH)
        call = asyncio.create_task(
            client.call(FREEZER_QUEUE, "freeze", {"year_month": MONTH}, request_id="sigterm-drain")
        )
        await wait_until_blocked_on_freeze_lock(db)
        assert freezer.proc is not None
        freezer.proc.send_signal(signal.SIGTERM)
        await wait_for_log_line(tmp_path / "freezer.log", '"worker_stopping"')
        # The freezer stopped consuming and is draining; the command it holds can now finish.
        await holder.fetchval(query("freeze_unlock_month"), MONTH)
        reply = await asyncio.wait_for(call, 30)
        assert reply["ok"] is True and reply["year_month"] == MONTH
        assert await asyncio.to_thread(freezer.proc.wait, 30) == 0
        assert await freeze_runs(db, "sigterm-drain") == 1
    finally:
        await holder.close()
        freezer.kill()


async def test_crash_mid_command_leaves_it_to_the_next_freezer(
    settings: Settings, db: asyncpg.Connection, client: CommandClient, tmp_path: Path
) -> None:
    first = await FreezerProcess(settings, tmp_path / "freezer-1.log").start()
    holder = await connect(settings.database_url)
    second: FreezerProcess | None = None
    try:
        await holder.fetchval(query("freeze_lock_month"), MONTH)
        call = asyncio.create_task(
            client.call(FREEZER_QUEUE, "freeze", {"year_month": MONTH}, request_id="crash-redeliver")
        )
        await wait_until_blocked_on_freeze_lock(db)
        first.kill()
        await holder.fetchval(query("freeze_unlock_month"), MONTH)
        assert not call.done()
        second = await FreezerProcess(settings, tmp_path / "freezer-2.log").start()
        reply = await asyncio.wait_for(call, 30)
        assert reply["ok"] is True and reply["year_month"] == MONTH
        assert await freeze_runs(db, "crash-redeliver") == 1
    finally:
        await holder.close()
        first.kill()
        if second is not None:
            second.kill()


@pytest.mark.parametrize("kind", ["reconciler", "freezer"])
async def test_a_worker_whose_http_port_is_taken_says_so_and_exits_1(
    settings: Settings, tmp_path: Path, kind: str
) -> None:
    """It used to hang (its broker connections, cancelled mid-connect, reconnected forever) and to
    ignore SIGTERM, with nothing in its log about the port."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**settings_env(settings), f"{kind.upper()}_HTTP_PORT": str(port)}
        command = [sys.executable, "-m", "services.cli", kind]
        run = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, timeout=30)
    assert run.returncode == 1
    [line] = [json.loads(x) for x in run.stderr.splitlines() if b"worker_start_failed" in x]
    assert str(port) in line["error"] and line["level"] == "error"


async def test_a_publisher_closed_while_connecting_leaves_no_connection_behind(amqp_url: str) -> None:
    """aio-pika's reconnection task outlived a cancelled first connect and retried forever, so a process
    stopping during its start-up never ended."""
    sockets_before = open_sockets()
    for delay in (0, 0.001, 0.003, 0.006, 0.01, 0.02):
        publisher = EventPublisher(amqp_url, timeout_ms=1000)
        await publisher.start()
        await asyncio.sleep(delay)
        await publisher.close()
        await asyncio.sleep(0.1)
        reconnecting = [t for t in asyncio.all_tasks() if "connection_factory" in repr(t.get_coro())]
        assert reconnecting == [], delay
        # Nor a socket: a wire or topology connection cancelled mid-start used to stay open for good.
        # (A transport closes on a later turn of the loop: allow a moment, never a garbage collection.)
        for _ in range(50):
            if open_sockets() <= sockets_before:
                break
            await asyncio.sleep(0.05)
        assert open_sockets() <= sockets_before, delay


def open_sockets() -> set[str]:
    """This process's open TCP connections to the broker (by inode): other tests' clients of Postgres
    or Redis closing late in the same process are no concern of this test (a full run caught one)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                mine.add(link[len("socket:[") : -1])
    to_broker = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in rows.readlines()[1:]:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[9] in mine and remote_port == AMQP_PORT:
                    to_broker.add(f"socket:[{fields[9]}]")
    return to_broker
