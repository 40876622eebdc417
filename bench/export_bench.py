"""Dispute export and invoice freeze at size (SPEC §9, §10): `python -m bench.export_bench`.

1. Export: N rows (default 1,000,000) of one site-month through the real HTTP endpoint of a
   `revkernel gateway` subprocess; the body is read in chunks, its SHA-256 checked against the header.
   Reports rows/s, time to first byte (the spool), and the gateway's memory: VmRSS sampled every 20 ms
   and VmHWM (peak) from /proc/<pid>/status, as growth over the idle baseline (target < 64 MiB).
   Baseline in the same run: Postgres alone writing the same rows as CSV (`COPY (query) TO STDOUT`).
2. Freeze: S sites (default 10,000) with rows in one month, `freeze_month` in this process; then the
   second freeze (everything skipped). Baseline: one GROUP BY count of
   the month. Also the plan of the per-site probe that finds the month's sites.

Uses its own database (`rk_export_bench`, dropped and migrated afresh) and a private redis-server for
the gateway, which is pointed at a closed port for RabbitMQ (the export does not publish).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from shared.auth import issue_token
from shared.db import create_pool
from shared.freeze import FreezeResult, freeze_month
from shared.migrate import migrate
from shared.months import add_months, current_year_month, month_first_day, month_start
from shared.queries import parse_queries, query
from shared.settings import Settings

BENCH_DIR = Path(__file__).resolve().parent
PG = "postgresql://postgres@127.0.0.1:5432"
DATABASE = "rk_export_bench"
JWT_SECRET = "export-bench-secret-that-is-long-enough-0123456789"
SQL = parse_queries((BENCH_DIR / "export_bench.sql").read_text(encoding="utf-8"))
MIB = 1024 * 1024


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/{pid}/status")


@dataclass
class RssSampler:
    """VmRSS of `pid` every `interval_s` in a thread (the event loop is busy reading the body)."""

    pid: int
    interval_s: float = 0.02
    peak_kib: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS"))
            self.samples += 1
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} never answered 200")


@dataclass
class ExportRun:
    status: int
    rows: int
    body_bytes: int
    hash_ok: bool
    first_byte_s: float
    total_s: float


def fetch_export(url: str, token: str) -> ExportRun:
    """GET the export, reading 1 MiB at a time; counts lines and checks the hash header."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    started = time.perf_counter()
    digest = hashlib.sha256()
    lines = size = 0
    with urllib.request.urlopen(request, timeout=600) as response:
        first_byte = time.perf_counter() - started
        header_hash = response.headers["x-opsmantik-export-hash"]
        row_count = int(response.headers["x-opsmantik-row-count"])
        while chunk := response.read(MIB):
            digest.update(chunk)
            lines += chunk.count(b"\n")
            size += len(chunk)
        status = response.status
    total = time.perf_counter() - started
    assert lines - 1 == row_count, (lines, row_count)
    return ExportRun(status, row_count, size, digest.hexdigest() == header_hash, first_byte, total)


async def reset_database(dsn: str) -> None:
    admin = await asyncpg.connect(f"{PG}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    finally:
        await admin.close()
    await migrate(dsn)


async def arrange_export(dsn: str, month: str, rows: int) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SQL["ensure_month"], month_first_day(month))
        site_id = await conn.fetchval(SQL["insert_site"], "export-bench")
        await conn.execute(SQL["add_owner"], site_id, "bench-owner")
        started = time.perf_counter()
        await conn.execute(SQL["insert_export_rows"], site_id, month_start(month), rows)
        await conn.execute("ANALYZE ingest_idempotency")
        print(f"  arranged {rows:,} rows in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return str(site_id)
    finally:
        await conn.close()


async def baseline_copy(dsn: str, site_id: str, month: str) -> tuple[float, int]:
    """Seconds for Postgres to write the same rows as CSV to a sink, and the bytes."""

    class Sink:
        size = 0

        async def __call__(self, chunk: bytes) -> None:
            self.size += len(chunk)

    conn = await asyncpg.connect(dsn)
    sink = Sink()
    try:
        started = time.perf_counter()
        await conn.copy_from_query(SQL["baseline_rows"], site_id, month, output=sink, format="csv")
        return time.perf_counter() - started, sink.size
    finally:
        await conn.close()


@dataclass(frozen=True)
class ExportBench:
    run: ExportRun
    idle_rss_kib: int
    peak_rss_sampled_kib: int
    peak_hwm_kib: int
    samples: int


@dataclass(frozen=True)
class FreezeBench:
    first: FreezeResult
    first_s: float
    second: FreezeResult
    second_s: float
    baseline_group_count_s: float
    probe_plan: list[str]


def run_export(settings_env: dict[str, str], site_id: str, month: str) -> ExportBench:
    port = free_port()
    env = {**settings_env, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), "LOG_LEVEL": "warning"}
    gateway = subprocess.Popen(
        [str(Path(sys.executable).parent / "revkernel"), "gateway"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/readyz")
        token = issue_token(Settings(auth_jwt_secret=JWT_SECRET), "bench-owner", 3600)
        # Warm-up: an empty month (imports, first pool connection, first spool) before the baseline.
        fetch_export(f"{base}/api/billing/dispute-export?site_id={site_id}&year_month=2000-01", token)
        idle_rss = proc_status_kib(gateway.pid, "VmRSS")
        sampler = RssSampler(gateway.pid)
        sampler.start()
        try:
            run = fetch_export(
                f"{base}/api/billing/dispute-export?site_id={site_id}&year_month={month}", token
            )
        finally:
            sampler.stop()
        peak_hwm = proc_status_kib(gateway.pid, "VmHWM")
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        try:
            gateway.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(gateway.pid, signal.SIGKILL)
            gateway.wait()
    return ExportBench(run, idle_rss, sampler.peak_kib, peak_hwm, sampler.samples)


def plan_nodes(node: dict[str, Any]) -> list[str]:
    """`Node Type using/on name` of every node of an EXPLAIN (FORMAT JSON) plan, depth first."""
    label = str(node["Node Type"])
    if "Index Name" in node:
        label += f" using {node['Index Name']}"
    elif "Relation Name" in node:
        label += f" on {node['Relation Name']}"
    return [label] + [n for child in node.get("Plans", []) for n in plan_nodes(child)]


async def bench_freeze(dsn: str, month: str, sites: int, rows_per_site: int) -> FreezeBench:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SQL["ensure_month"], month_first_day(month))
        started = time.perf_counter()
        await conn.execute(SQL["insert_sites"], "freeze-bench-", sites)
        await conn.execute(SQL["insert_rows_per_site"], "freeze-bench-", month_start(month), rows_per_site)
        await conn.execute("ANALYZE")
        print(
            f"  arranged {sites:,} sites x {rows_per_site} rows in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + query("freeze_sites_with_rows"), month)
        started = time.perf_counter()
        await conn.fetchval(SQL["baseline_group_count"], month)
        baseline_s = time.perf_counter() - started
    finally:
        await conn.close()
    pool = await create_pool(dsn, min_size=2, max_size=10)
    try:
        started = time.perf_counter()
        first = await freeze_month(pool, month, commit_sha="bench", generated_by="bench")
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        second = await freeze_month(pool, month, commit_sha="bench", generated_by="bench")
        second_s = time.perf_counter() - started
    finally:
        await pool.close()
    explained = orjson.loads(plan) if isinstance(plan, str) else plan
    return FreezeBench(first, first_s, second, second_s, baseline_s, plan_nodes(explained[0]["Plan"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, default=10_000)
    parser.add_argument("--rows-per-site", type=int, default=10)
    args = parser.parse_args()
    dsn = f"{PG}/{DATABASE}"
    export_month = add_months(current_year_month(), -2)
    freeze_m = add_months(current_year_month(), -3)
    redis_port = free_port()
    redis_server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = dict(os.environ)
    env.update(
        DATABASE_URL=dsn,
        REDIS_URL=redis_url,
        AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",  # closed port: the export does not publish
        AUTH_JWT_SECRET=JWT_SECRET,
        COMMIT_SHA="bench",
        GIT_BRANCH="bench",
    )
    try:
        print("preparing database", file=sys.stderr)
        asyncio.run(reset_database(dsn))
        site_id = asyncio.run(arrange_export(dsn, export_month, args.rows))
        copy_s, copy_bytes = asyncio.run(baseline_copy(dsn, site_id, export_month))
        print("exporting through the gateway", file=sys.stderr)
        export = run_export(env, site_id, export_month)
        print("freezing", file=sys.stderr)
        freeze = asyncio.run(bench_freeze(dsn, freeze_m, args.sites, args.rows_per_site))
    finally:
        redis_server.terminate()
        redis_server.wait(timeout=10)
        admin_drop = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-q",
                "-c",
                f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)',
            ],
            capture_output=True,
            check=False,
        )
        if admin_drop.returncode != 0:
            print(f"could not drop {DATABASE}: {admin_drop.stderr.decode().strip()}", file=sys.stderr)

    run = export.run
    mib = 1024.0
    print(
        f"# Dispute export and freeze bench ({platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, PostgreSQL at {PG})\n"
    )
    print(
        f"## Export of {run.rows:,} rows ({run.body_bytes / MIB:.1f} MiB) via GET /api/billing/dispute-export"
    )
    print(
        f"- status {run.status}; x-opsmantik-export-hash equals the SHA-256 of the body read: {run.hash_ok}"
    )
    print(
        f"- total {run.total_s:.2f} s = {run.rows / run.total_s:,.0f} rows/s; "
        f"time to first byte (the spool under the tenant role) {run.first_byte_s:.2f} s"
    )
    print(
        f"- baseline, same run: Postgres alone writing the same rows as CSV (COPY) {copy_s:.2f} s "
        f"({copy_bytes / MIB:.1f} MiB); export / baseline = {run.total_s / copy_s:.1f}x"
    )
    print(
        f"- gateway memory: idle VmRSS {export.idle_rss_kib / mib:.1f} MiB; peak VmRSS sampled every 20 ms "
        f"{export.peak_rss_sampled_kib / mib:.1f} MiB ({export.samples} samples); VmHWM after "
        f"{export.peak_hwm_kib / mib:.1f} MiB"
    )
    print(
        f"- growth over idle: sampled {(export.peak_rss_sampled_kib - export.idle_rss_kib) / mib:.1f} MiB, "
        f"by VmHWM {(export.peak_hwm_kib - export.idle_rss_kib) / mib:.1f} MiB (target < 64 MiB)\n"
    )
    print(f"## Freeze of {freeze.first.total_sites:,} sites x {args.rows_per_site} rows")
    print(f"- first freeze: {freeze.first_s:.2f} s, inserted {freeze.first.inserted:,}")
    print(
        f"- second freeze: {freeze.second_s:.2f} s, inserted {freeze.second.inserted}, "
        f"skipped {freeze.second.skipped:,}"
    )
    print(
        f"- baseline, same run: one GROUP BY count of the month {freeze.baseline_group_count_s:.2f} s; "
        f"first freeze / baseline = {freeze.first_s / freeze.baseline_group_count_s:.0f}x"
    )
    print(f"- plan of the per-site probe (freeze_sites_with_rows): {' > '.join(freeze.probe_plan)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
