"""docs/openapi.yaml stays true: every gateway route is documented, and Schemathesis, run against a live
fleet (gateway, reconciler and freezer processes on this test's Postgres, Redis and RabbitMQ, with a
seeded site), finds no 5xx and no answer outside the documented statuses, media types, headers and
schemas."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import yaml

from services.gateway.app import build_app
from shared.auth import issue_token
from shared.settings import Settings
from shared.sites import create_site
from tests.conftest import CRON_SECRET, REPO_ROOT, free_port, settings_env
from tests.support.gateway_process import GatewayProcess

OPENAPI = REPO_ROOT / "docs" / "openapi.yaml"
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance,ignored_auth"
)
MAX_EXAMPLES = 12
ST_TIMEOUT_S = 150
EXAMPLE_SITE_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch"}


def documented_operations() -> set[tuple[str, str]]:
    spec = yaml.safe_load(OPENAPI.read_text())
    return {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def routed_operations() -> set[tuple[str, str]]:
    """The gateway's routes, less aiohttp's automatic HEAD for GET and the /api/sync 405 catch-all."""
    app = build_app(Settings())
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and getattr(route.handler, "__name__", "") != "sync_method_not_allowed"
    }


def test_every_route_is_documented_and_every_documented_operation_is_routed() -> None:
    routed, documented = routed_operations(), documented_operations()
    assert routed - documented == set(), "routes missing from docs/openapi.yaml"
    assert documented - routed == set(), "documented operations the gateway does not serve"


def test_every_response_documents_the_build_and_error_headers() -> None:
    spec = yaml.safe_load(OPENAPI.read_text())
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            for status, response in operation["responses"].items():
                headers = response.get("headers") or {}
                for name in ("x-opsmantik-commit", "x-opsmantik-branch", "x-request-id"):
                    assert name in headers, (method, path, status, name)
                # A not-ready probe answers its checks, not an error code.
                if int(status) >= 400 and path != "/readyz":
                    assert "x-opsmantik-error-code" in headers, (method, path, status)


def statuses_by_operation(log: Path) -> dict[tuple[str, str], Counter[int]]:
    """(method, path) → status counts, from the gateway's one-line-per-request JSON log."""
    documented = {path for _, path in documented_operations()}
    out: dict[tuple[str, str], Counter[int]] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("event") == "request" and entry.get("path") in documented:
            out.setdefault((entry["method"], entry["path"]), Counter())[int(entry["status"])] += 1
    return out


def _log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def _start_worker(
    kind: str, env: dict[str, str], port_var: str, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", kind],
            env={**env, port_var: str(port)}, stdout=out, stderr=out,
        )
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {proc.returncode}:\n{_log_tail(log)}")
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return proc, port
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} never became ready:\n{_log_tail(log)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def test_schemathesis_finds_no_contract_violation(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The documented examples name these: `site-a` for /api/sync, EXAMPLE_SITE_ID for the export.
    await create_site(db, public_id="site-a", allowed_origins=["*"], monthly_limit=100_000,
                      rate_limit_per_minute=100_000)
    await db.execute(
        "INSERT INTO sites (id, public_id, name, allowed_origins) VALUES ($1, 'site-example', 'x', '{*}')",
        EXAMPLE_SITE_ID,
    )
    await db.execute("INSERT INTO platform_admins (user_id) VALUES ('contract-admin')")
    env = settings_env(settings.with_overrides(command_timeout_s=20.0))
    gateway = GatewayProcess(env, tmp_path / "gateway.log")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        await gateway.start()
        for kind, port_var in (("reconciler", "RECONCILER_HTTP_PORT"), ("freezer", "FREEZER_HTTP_PORT")):
            proc, _ = await _start_worker(kind, env, port_var, tmp_path / f"{kind}.log")
            workers.append(proc)

        config = tmp_path / "schemathesis.toml"
        config.write_text(
            "[auth.openapi.cronSecret]\nbearer = \"${RK_CRON}\"\n\n"
            "[auth.openapi.userJwt]\nbearer = \"${RK_JWT}\"\n"
        )
        st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
        st_env = {
            **os.environ,
            "RK_CRON": CRON_SECRET,
            "RK_JWT": issue_token(settings, "contract-admin", ttl_seconds=3600),
            "NO_COLOR": "1",
        }
        started = time.monotonic()
        st_proc = await asyncio.create_subprocess_exec(
            st, "--config-file", str(config), "run", str(OPENAPI), "--url", gateway.url,
            "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES),
            "--phases", "examples,coverage,fuzzing", "--seed", "20261125", "--workers", "2",
            "--request-timeout", "30", "--suppress-health-check", "all",
            cwd=tmp_path, env=st_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(st_proc.communicate(), timeout=ST_TIMEOUT_S)
        except TimeoutError:
            st_proc.kill()
            await st_proc.wait()
            raise
        report = out.decode(errors="replace")
        elapsed = time.monotonic() - started
        summary = [line for line in report.splitlines() if re.search(r"passed|failed|error", line, re.I)][-5:]
        with capsys.disabled():
            print(f"\nschemathesis: exit {st_proc.returncode} in {elapsed:.1f}s; " + " | ".join(summary))
        assert st_proc.returncode == 0, report[-12000:] + "\n--- gateway log ---\n" + gateway.log_tail()
        await gateway.stop()  # its access log is written in batches: the last ones go out as it stops
        statuses = statuses_by_operation(tmp_path / "gateway.log")
        documented = documented_operations()
        print("answers by operation: " + "; ".join(
            f"{method} {path} {dict(sorted(counts.items()))}"
            for (method, path), counts in sorted(statuses.items())
            if (method, path) in documented
        ))
        # The run reached the success path of every operation, not only its error answers (/healthz is
        # the one path the gateway does not log: probe noise).
        without_success = sorted(
            op for op in documented - {("GET", "/healthz")}
            if not any(200 <= status < 300 for status in statuses.get(op, {}))
        )
        assert without_success == [], without_success
    finally:
        for worker in workers:
            _stop(worker)
        await gateway.stop()

