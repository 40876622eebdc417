"""The admin commands of `revkernel` (SPEC §13), run as the real console script against a real database:
migrate, site create, plan set, member add, token, and one clear line on stderr for every mistake."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from shared.auth import verify_token
from shared.migrate import load_migrations
from shared.settings import Settings
from shared.sites import create_site, resolve_site
from tests.conftest import CRON_SECRET, JWT_SECRET, PG_ADMIN_DSN, REPO_ROOT, free_port, pg_dsn, settings_env

_SCRIPT = Path(sys.executable).with_name("revkernel")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "services.cli"]


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        """The one line a failed command prints; fails the test if it printed anything else."""
        lines = self.stderr.splitlines()
        assert self.code != 0, self
        assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
        assert self.stdout == "", self
        return lines[0]


async def revkernel(settings: Settings, *args: str, **env_changes: str | None) -> Run:
    env = settings_env(settings)
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        env=env,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


# Admin commands need only Postgres: Redis and the broker point at a port where nothing listens, so a
# command that started using them would fail here instead of touching the shared servers' data.
NOWHERE = {"redis_url": "redis://127.0.0.1:1/0", "amqp_url": "amqp://guest:guest@127.0.0.1:1/"}


@pytest.fixture
def cli_settings(database_url: str) -> Settings:
    """Admin commands need only Postgres (and the JWT secret for `token`)."""
    return Settings(
        database_url=database_url, cron_secret=CRON_SECRET, auth_jwt_secret=JWT_SECRET, **NOWHERE
    )


@pytest.fixture
async def new_database_settings() -> AsyncIterator[Settings]:
    name = f"rk_cli_{uuid.uuid4().hex[:12]}"
    yield Settings(database_url=pg_dsn(name), **NOWHERE)
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_migrate_creates_the_database_and_the_second_run_applies_nothing(
    new_database_settings: Settings,
) -> None:
    before = await revkernel(new_database_settings, "site", "create", "--public-id", "too-early")
    assert "does not exist" in before.error_line

    first = await revkernel(new_database_settings, "migrate")
    assert first.code == 0, first.stderr
    names = [m.name for m in load_migrations()]
    assert first.stdout == f"applied {len(names)} migration(s): {', '.join(names)}\n"

    second = await revkernel(new_database_settings, "migrate")
    assert (second.code, second.stdout) == (0, "applied 0 migration(s)\n")


async def test_site_whose_routing_key_would_not_fit_is_refused(
    cli_settings: Settings, db: asyncpg.Connection
) -> None:
    """128 characters pass the column's check, but `event.` + 250 bytes of UTF-8 is no AMQP short string."""
    run = await revkernel(cli_settings, "site", "create", "--public-id", "é" * 125)
    assert run.code != 0 and "routing key" in run.stderr and "Traceback" not in run.stderr
    assert await db.fetchval("SELECT count(*) FROM sites") == 0
    ok = await revkernel(cli_settings, "site", "create", "--public-id", "é" * 124)  # 6 + 248 bytes
    assert ok.code == 0, ok.stderr


async def test_site_create_prints_the_site_with_its_plan(
    cli_settings: Settings, db: asyncpg.Connection
) -> None:
    run = await revkernel(
        cli_settings,
        "site", "create", "--public-id", "shop", "--name", "Shop",
        "--origin", "https://a.example", "--origin", "https://b.example",
        "--monthly-limit", "500", "--soft-limit", "--hard-cap-multiplier", "1.5",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    site = json.loads(run.stdout)
    assert site == {
        "id": site["id"],
        "public_id": "shop",
        "name": "Shop",
        "allowed_origins": ["https://a.example", "https://b.example"],
        "rate_limit_per_minute": None,
        "plan_tier": "free",
        "monthly_limit": 500,
        "soft_limit_enabled": True,
        "hard_cap_multiplier": "1.5",
    }
    row = await db.fetchrow(
        "SELECT s.public_id, s.allowed_origins, p.monthly_limit, p.soft_limit_enabled, p.hard_cap_multiplier"
        " FROM sites s JOIN site_plans p ON p.site_id = s.id WHERE s.id = $1",
        uuid.UUID(site["id"]),
    )
    assert tuple(row) == ("shop", ["https://a.example", "https://b.example"], 500, True, 1.5)


async def test_site_without_plan_flags_uses_the_default_plan(
    cli_settings: Settings, db: asyncpg.Connection
) -> None:
    run = await revkernel(cli_settings, "site", "create", "--public-id", "plain", DEFAULT_MONTHLY_LIMIT="42")
    assert run.code == 0, run.stderr
    site = json.loads(run.stdout)
    assert (site["monthly_limit"], site["soft_limit_enabled"], site["allowed_origins"]) == (42, False, [])
    assert await db.fetchval("SELECT count(*) FROM site_plans") == 0


async def test_plan_set_by_public_id_and_by_uuid(cli_settings: Settings, db: asyncpg.Connection) -> None:
    site = await create_site(db, public_id="shop")

    by_public_id = await revkernel(
        cli_settings,
        "plan",
        "set",
        "--site",
        "shop",
        "--monthly-limit",
        "10",
        "--soft-limit",
        "--tier",
        "pro",
    )
    assert by_public_id.code == 0, by_public_id.stderr
    shown = json.loads(by_public_id.stdout)
    assert (shown["id"], shown["plan_tier"], shown["monthly_limit"], shown["soft_limit_enabled"]) == (
        str(site.id), "pro", 10, True,
    )  # fmt: skip

    by_uuid = await revkernel(
        cli_settings, "plan", "set", "--site", str(site.id).upper(), "--monthly-limit", "20",
        "--no-soft-limit", "--hard-cap-multiplier", "3",
    )  # fmt: skip
    assert by_uuid.code == 0, by_uuid.stderr
    row = await db.fetchrow("SELECT * FROM site_plans WHERE site_id = $1", site.id)
    plan = (row["plan_tier"], row["monthly_limit"], row["soft_limit_enabled"], row["hard_cap_multiplier"])
    assert plan == ("pro", 20, False, 3)
    audit = await db.fetch("SELECT action, site_id FROM billing_audit_log ORDER BY id")
    assert [(r["action"], r["site_id"]) for r in audit] == [("plan_set", site.id), ("plan_set", site.id)]


async def test_a_uuid_names_its_site_even_when_another_public_id_spells_it(db: asyncpg.Connection) -> None:
    """Public ids are free text: site B may carry site A's UUID as its public id. `--site <uuid>` (every
    CLI command resolves sites this way) must still mean A, whichever row the scan meets first."""
    a_id = uuid.uuid4()
    b = await create_site(db, public_id=str(a_id))  # inserted first: a scan meets it first
    await db.execute("INSERT INTO sites (id, public_id) VALUES ($1, 'site-a')", a_id)

    assert (await resolve_site(db, str(a_id))).id == a_id
    assert (await resolve_site(db, str(a_id).upper())).id == a_id
    assert (await resolve_site(db, str(b.id))).id == b.id
    assert (await resolve_site(db, "site-a")).id == a_id


async def test_member_add_and_change_role(cli_settings: Settings, db: asyncpg.Connection) -> None:
    site = await create_site(db, public_id="shop")
    run = await revkernel(
        cli_settings, "member", "add", "--site", "shop", "--user", "alice", "--role", "billing"
    )
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout) == {
        "site_id": str(site.id),
        "public_id": "shop",
        "user_id": "alice",
        "role": "billing",
    }
    run = await revkernel(
        cli_settings, "member", "add", "--site", str(site.id), "--user", "alice", "--role", "viewer"
    )
    assert run.code == 0, run.stderr
    rows = await db.fetch("SELECT site_id, user_id, role FROM site_members")
    assert [tuple(r) for r in rows] == [(site.id, "alice", "viewer")]


async def test_token_prints_only_a_jwt_the_gateway_accepts(cli_settings: Settings) -> None:
    run = await revkernel(cli_settings, "token", "--user", "alice", "--ttl", "120")
    assert run.code == 0, run.stderr
    assert run.stdout.count("\n") == 1
    principal = verify_token(cli_settings, run.stdout.strip())
    assert principal.user_id == "alice"
    assert principal.claims["exp"] - principal.claims["iat"] == 120


@pytest.mark.parametrize("secret", [None, "", "x" * 31])
async def test_token_without_a_usable_secret_fails_in_one_line(
    cli_settings: Settings, secret: str | None
) -> None:
    run = await revkernel(cli_settings, "token", "--user", "alice", AUTH_JWT_SECRET=secret)
    assert run.code == 2
    assert run.error_line == "revkernel: error: AUTH_JWT_SECRET must be set and at least 32 bytes"


async def test_mistakes_fail_with_one_line_and_change_nothing(
    cli_settings: Settings, db: asyncpg.Connection
) -> None:
    # Argument mistakes are caught before any I/O: tests/unit/test_cli_args.py covers them in-process.
    site = await create_site(db, public_id="shop", monthly_limit=7)
    unknown_uuid = str(uuid.uuid4())
    cases: list[tuple[list[str], dict[str, str | None], str]] = [
        (["member", "add", "--site", "nope", "--user", "u", "--role", "owner"], {},
         "revkernel: error: no site with id or public id 'nope'"),
        (["plan", "set", "--site", "nope", "--monthly-limit", "5"], {},
         "revkernel: error: no site with id or public id 'nope'"),
        (["plan", "set", "--site", unknown_uuid, "--monthly-limit", "5"], {},
         f"revkernel: error: no site with id or public id '{unknown_uuid}'"),
        (["site", "create", "--public-id", "shop"], {},
         "revkernel: error: a site with public id 'shop' already exists"),
        (["site", "create", "--public-id", "x" * 129], {}, "revkernel: error: invalid site: new row"),
        (["site", "create", "--public-id", "new"], {"DEFAULT_MONTHLY_LIMIT": "lots"},
         "revkernel: error: DEFAULT_MONTHLY_LIMIT must be a whole number, got 'lots'"),
    ]  # fmt: skip
    runs = await asyncio.gather(*(revkernel(cli_settings, *args, **env) for args, env, _ in cases))
    for (args, _, expected), run in zip(cases, runs, strict=True):
        assert run.error_line.startswith(expected), (args, run.error_line)
        assert run.code == 2, (args, run)
    assert await db.fetchval("SELECT count(*) FROM sites") == 1
    assert await db.fetchval("SELECT monthly_limit FROM site_plans WHERE site_id = $1", site.id) == 7
    assert await db.fetchval("SELECT count(*) FROM site_members") == 0


async def test_unreachable_database_is_one_line_without_the_password(cli_settings: Settings) -> None:
    dead = Settings(database_url=f"postgresql://svc:hunter2-secret@127.0.0.1:{free_port()}/revkernel")
    for args in (["site", "create", "--public-id", "x"], ["migrate"]):
        run = await revkernel(dead, *args)
        line = run.error_line
        assert run.code == 2
        assert line.startswith("revkernel: error: ")
        assert "127.0.0.1" in line and "hunter2-secret" not in line


def test_console_script_is_installed() -> None:
    assert shutil.which("revkernel", path=str(Path(sys.executable).parent)), (
        "pip install -e . provides revkernel"
    )
