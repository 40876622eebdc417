"""Dispute export (SPEC §10) through the real gateway app on a real socket, against real Postgres."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import jwt
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from structlog.testing import capture_logs

from services.gateway.app import build_app
from shared.auth import issue_token
from shared.db import tenant_transaction
from shared.dispute_export import CSV_HEADER, write_export
from shared.months import add_months, current_year_month, month_start
from shared.settings import Settings
from shared.sites import add_member, create_site
from tests.conftest import JWT_SECRET, free_port, settings_env
from tests.support.gateway import raw_request

PATH = "/api/billing/dispute-export"
# Far enough in the past that the test never straddles the month it exports.
MONTH = add_months(current_year_month(), -3)
OTHER_MONTH = add_months(MONTH, 1)

OpenGateway = Callable[[Settings], Awaitable[str]]


@pytest.fixture
async def open_gateway() -> AsyncIterator[OpenGateway]:
    """Start the gateway app (as `build_app` makes it) on a free port; returns its base URL."""
    servers: list[TestServer] = []

    async def start(settings: Settings) -> str:
        server = TestServer(build_app(settings), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def insert_row(
    db: asyncpg.Connection,
    site_id: uuid.UUID,
    key: str,
    created_at: datetime,
    *,
    version: int = 1,
    state: str = "ACCEPTED",
    billable: bool = True,
    reason: str | None = None,
) -> None:
    await db.execute(
        """INSERT INTO ingest_idempotency (site_id, idempotency_key, idempotency_version, bucket_at,
                                           created_at, billing_state, billable, billing_reason)
           VALUES ($1, $2, $3, $4, $4, $5::billing_state, $6, $7)""",
        site_id,
        key,
        version,
        created_at,
        state,
        billable,
        reason,
    )


class World:
    """Two sites with members of every role, a platform admin, and rows of MONTH for both sites."""

    def __init__(self, site: uuid.UUID, other: uuid.UUID) -> None:
        self.site = site
        self.other = other


@pytest.fixture
async def world(db: asyncpg.Connection) -> World:
    await db.execute("SELECT ingest_idempotency_ensure_partitions($1::date, 2)", month_start(MONTH).date())
    site = (await create_site(db, public_id="export-site")).id
    other = (await create_site(db, public_id="other-site")).id
    for user, role in [
        ("owner-1", "owner"),
        ("admin-1", "admin"),
        ("billing-1", "billing"),
        ("viewer-1", "viewer"),
    ]:
        await add_member(db, site, user, role)
    await add_member(db, other, "other-owner", "owner")
    await db.execute("INSERT INTO platform_admins (user_id) VALUES ('root-1')")
    base = month_start(MONTH)
    t1 = base + timedelta(days=4, hours=10, microseconds=123456)
    # Written out of order, and two rows share one instant (then `id` orders them).
    await insert_row(db, site, "c" * 64, base + timedelta(days=20), state="OVERAGE")
    await insert_row(db, site, "a" * 64, t1)
    await insert_row(db, site, "v2:" + "b" * 64, t1, version=2, billable=False, reason="rejected_quota")
    await insert_row(db, site, "d" * 64, base, state="DEGRADED_CAPTURE")
    await insert_row(
        db,
        site,
        "e" * 64,
        base + timedelta(days=27, microseconds=7),
        state="RECOVERED",
        billable=False,
        reason="system",
    )
    # Not exported: another site's row of the month, and the site's row of the next month.
    await insert_row(db, other, "f" * 64, t1)
    await insert_row(db, site, "9" * 64, month_start(OTHER_MONTH) + timedelta(hours=1))
    return World(site, other)


def expected_body() -> bytes:
    y, m = MONTH.split("-")
    return (
        "created_at,idempotency_key,idempotency_version,billing_state,billable\n"
        f"{y}-{m}-01T00:00:00.000000Z,{'d' * 64},1,DEGRADED_CAPTURE,true\n"
        f"{y}-{m}-05T10:00:00.123456Z,{'a' * 64},1,ACCEPTED,true\n"
        f"{y}-{m}-05T10:00:00.123456Z,v2:{'b' * 64},2,ACCEPTED,false\n"
        f"{y}-{m}-21T00:00:00.000000Z,{'c' * 64},1,OVERAGE,true\n"
        f"{y}-{m}-28T00:00:00.000007Z,{'e' * 64},1,RECOVERED,false\n"
    ).encode()


def token(user: str) -> str:
    return issue_token(Settings(auth_jwt_secret=JWT_SECRET), user)


async def export(
    http: aiohttp.ClientSession,
    base: str,
    *,
    site: object,
    month: str = MONTH,
    bearer: str | None = None,
    method: str = "GET",
) -> tuple[int, CIMultiDict[str], bytes]:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
    async with http.request(
        method, f"{base}{PATH}", params={"site_id": str(site), "year_month": month}, headers=headers
    ) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


async def test_owner_gets_exactly_the_rows_of_the_site_and_month(
    settings: Settings,
    open_gateway: OpenGateway,
    http: aiohttp.ClientSession,
    world: World,
    db: asyncpg.Connection,
) -> None:
    base = await open_gateway(settings)
    with capture_logs() as logs:
        status, headers, body = await export(http, base, site=world.site, bearer=token("owner-1"))
    assert status == 200
    assert body == expected_body()
    assert headers["x-opsmantik-export-hash"] == hashlib.sha256(body).hexdigest()
    assert headers["x-opsmantik-row-count"] == "5"
    assert "x-opsmantik-snapshot-hash" not in headers
    assert headers["Content-Type"].startswith("text/csv")
    assert headers["Content-Disposition"] == f'attachment; filename="dispute-{world.site}-{MONTH}.csv"'
    assert headers["x-opsmantik-commit"] == "testsha"
    assert headers["x-request-id"]

    audit = await db.fetch("SELECT * FROM billing_audit_log WHERE action = 'dispute_export'")
    assert len(audit) == 1
    assert audit[0]["actor"] == "user:owner-1"
    assert audit[0]["site_id"] == world.site and audit[0]["year_month"] == MONTH
    assert audit[0]["request_id"] == headers["x-request-id"]
    assert audit[0]["details"]["export_hash"] == headers["x-opsmantik-export-hash"]
    assert audit[0]["details"]["row_count"] == 5

    [line] = [e for e in logs if e["event"] == "BILLING_DISPUTE_EXPORT"]
    assert line["site_id"] == str(world.site) and line["year_month"] == MONTH
    assert line["row_count"] == 5 and line["user_id"] == "owner-1"
    assert line["export_hash"] == headers["x-opsmantik-export-hash"]


async def test_the_http_export_reads_as_the_tenant_role(
    settings: Settings,
    open_gateway: OpenGateway,
    http: aiohttp.ClientSession,
    world: World,
    db: asyncpg.Connection,
) -> None:
    """SPEC §10: the export runs under the tenant role, so RLS decides what it reads. A policy that only
    the tenant role meets hides one row: an export read as the service role or a superuser shows it."""
    await db.execute(
        f"""CREATE POLICY hide_one_row ON ingest_idempotency AS RESTRICTIVE FOR SELECT TO revkernel_tenant
            USING (idempotency_key <> '{"a" * 64}')"""
    )
    base = await open_gateway(settings)
    status, headers, body = await export(http, base, site=world.site, bearer=token("owner-1"))
    assert status == 200
    shown = [line for line in expected_body().splitlines(keepends=True) if b"a" * 64 not in line]
    assert body == b"".join(shown)
    assert headers["x-opsmantik-row-count"] == "4"


async def test_head_is_405_and_leaves_the_connection_usable(
    settings: Settings,
    open_gateway: OpenGateway,
    http: aiohttp.ClientSession,
    world: World,
    db: asyncpg.Connection,
) -> None:
    """A HEAD answer has no body: the streamed CSV used to follow it, and the next answer on the
    kept-alive connection was read from the CSV's first line."""
    base = await open_gateway(settings)
    for _ in range(2):
        status, headers, _ = await export(http, base, site=world.site, bearer=token("owner-1"), method="HEAD")
        assert status == 405 and "GET" in headers["Allow"]
        status, _, body = await export(http, base, site=world.site, bearer=token("owner-1"))
        assert (status, body) == (200, expected_body())
    assert await db.fetchval("SELECT count(*) FROM billing_audit_log WHERE action = 'dispute_export'") == 2


async def test_admin_billing_and_platform_admin_may_export(
    settings: Settings, open_gateway: OpenGateway, http: aiohttp.ClientSession, world: World
) -> None:
    base = await open_gateway(settings)
    for user in ("admin-1", "billing-1", "root-1"):
        status, headers, body = await export(http, base, site=world.site, bearer=token(user))
        assert (status, body) == (200, expected_body()), user


async def test_empty_month_is_a_header_only_csv(
    settings: Settings, open_gateway: OpenGateway, http: aiohttp.ClientSession, world: World
) -> None:
    base = await open_gateway(settings)
    status, headers, body = await export(
        http, base, site=world.site, month=add_months(MONTH, -1), bearer=token("owner-1")
    )
    assert (status, body, headers["x-opsmantik-row-count"]) == (200, CSV_HEADER, "0")
    assert headers["x-opsmantik-export-hash"] == hashlib.sha256(CSV_HEADER).hexdigest()


async def test_snapshot_hash_header_present_only_once_frozen(
    settings: Settings,
    open_gateway: OpenGateway,
    http: aiohttp.ClientSession,
    world: World,
    db: asyncpg.Connection,
) -> None:
    base = await open_gateway(settings)
    _, before, _ = await export(http, base, site=world.site, bearer=token("owner-1"))
    assert "x-opsmantik-snapshot-hash" not in before
    await db.execute(
        """INSERT INTO invoice_snapshot (site_id, year_month, event_count, overage_count, snapshot_hash,
                                         commit_sha, generated_by)
           VALUES ($1, $2, 3, 1, 'feedface', 'testsha', 'test')""",
        world.site,
        MONTH,
    )
    status, after, body = await export(http, base, site=world.site, bearer=token("owner-1"))
    assert status == 200 and body == expected_body()
    assert after["x-opsmantik-snapshot-hash"] == "feedface"
    # Another month of the same site has no snapshot.
    _, other, _ = await export(http, base, site=world.site, month=OTHER_MONTH, bearer=token("owner-1"))
    assert "x-opsmantik-snapshot-hash" not in other


def _forged(claims: dict[str, object], secret: str = JWT_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


async def test_auth_and_validation_matrix(
    settings: Settings,
    open_gateway: OpenGateway,
    http: aiohttp.ClientSession,
    world: World,
    db: asyncpg.Connection,
) -> None:
    base = await open_gateway(settings)
    now = int(time.time())
    cases: list[tuple[str, dict[str, object], str | None, int, str]] = [
        ("no token", {"site": world.site}, None, 401, "unauthorized"),
        ("garbage token", {"site": world.site}, "not-a-jwt", 401, "unauthorized"),
        (
            "bad signature",
            {"site": world.site},
            _forged({"sub": "owner-1", "exp": now + 60}, "another-secret-that-is-long-enough-0123456789"),
            401,
            "unauthorized",
        ),
        ("expired", {"site": world.site}, _forged({"sub": "owner-1", "exp": now - 120}), 401, "unauthorized"),
        ("no exp", {"site": world.site}, _forged({"sub": "owner-1"}), 401, "unauthorized"),
        ("no sub", {"site": world.site}, _forged({"exp": now + 60}), 401, "unauthorized"),
        # 401 comes before 400: a bad query with no credentials is still 401.
        ("401 before 400", {"site": "nope"}, None, 401, "unauthorized"),
        ("bad site_id", {"site": "not-a-uuid"}, token("owner-1"), 400, "invalid_site_id"),
        ("bad month", {"site": world.site, "month": "2026-13"}, token("owner-1"), 400, "invalid_year_month"),
        (
            "bad month format",
            {"site": world.site, "month": "2026-1"},
            token("owner-1"),
            400,
            "invalid_year_month",
        ),
        # Python's `$` and `\d` took these; Postgres's check did not, and the audit insert failed (503).
        (
            "month with a newline",
            {"site": world.site, "month": "2026-08\n"},
            token("owner-1"),
            400,
            "invalid_year_month",
        ),
        (
            "month in Arabic-Indic digits",
            {"site": world.site, "month": "\u0662\u0660\u0662\u0666-08"},
            token("owner-1"),
            400,
            "invalid_year_month",
        ),
        # 400 comes before 403: a stranger with a bad month learns nothing about the site.
        ("400 before 403", {"site": world.site, "month": "x"}, token("stranger"), 400, "invalid_year_month"),
        ("viewer", {"site": world.site}, token("viewer-1"), 403, "forbidden"),
        ("member of another site", {"site": world.site}, token("other-owner"), 403, "forbidden"),
        ("no membership", {"site": world.site}, token("stranger"), 403, "forbidden"),
        ("unknown site, non-admin", {"site": uuid.uuid4()}, token("owner-1"), 403, "forbidden"),
        ("unknown site, platform admin", {"site": uuid.uuid4()}, token("root-1"), 404, "site_not_found"),
    ]
    for name, query, bearer, want_status, want_code in cases:
        status, headers, body = await export(
            http, base, site=query["site"], month=str(query.get("month", MONTH)), bearer=bearer
        )
        assert status == want_status, (name, status, body)
        assert headers["x-opsmantik-error-code"] == want_code, name
        assert b'"ok":false' in body, name
        assert b"export-site" not in body and b"a" * 64 not in body, name
    # Refused requests leave no audit record.
    assert await db.fetchval("SELECT count(*) FROM billing_audit_log WHERE action = 'dispute_export'") == 0


async def test_a_bearer_that_is_not_utf8_is_401(
    settings: Settings, open_gateway: OpenGateway, world: World
) -> None:
    base = await open_gateway(settings)
    port = int(base.rsplit(":", 1)[1])
    path = f"{PATH}?site_id={world.site}&year_month={MONTH}"
    status, body = await raw_request(port, "GET", path, b"Authorization: Bearer eyJ\xff.x.y")
    assert (status, body["error"]) == (401, "unauthorized")


async def test_missing_site_id_parameter_is_400(
    settings: Settings, open_gateway: OpenGateway, http: aiohttp.ClientSession, world: World
) -> None:
    base = await open_gateway(settings)
    async with http.get(
        f"{base}{PATH}?year_month={MONTH}", headers={"Authorization": f"Bearer {token('owner-1')}"}
    ) as r:
        assert (r.status, r.headers["x-opsmantik-error-code"]) == (400, "invalid_site_id")
        assert (await r.json())["detail"] == "site_id must be the site's UUID"


async def test_a_refused_token_is_explained_without_the_parser_s_words(
    settings: Settings, open_gateway: OpenGateway, http: aiohttp.ClientSession, world: World
) -> None:
    base = await open_gateway(settings)
    now = int(time.time())
    for bearer, reason in (
        ("abc.def.ghi", "invalid token"),  # PyJWT: "Invalid header string: 'utf-8' codec can't decode ..."
        (_forged({"sub": "owner-1", "exp": now - 120}), "token expired"),
    ):
        status, headers, body = await export(http, base, site=world.site, month=MONTH, bearer=bearer)
        assert (status, headers["x-opsmantik-error-code"]) == (401, "unauthorized")
        assert json.loads(body)["detail"] == reason


@pytest.mark.parametrize("secret", [None, "too-short-secret"])
async def test_unusable_jwt_secret_answers_503(
    settings: Settings,
    open_gateway: OpenGateway,
    http: aiohttp.ClientSession,
    world: World,
    secret: str | None,
) -> None:
    with capture_logs() as logs:
        base = await open_gateway(settings.with_overrides(auth_jwt_secret=secret))
    # SPEC §10: "still starts, logs an error" (at start-up, not only when an export is asked for).
    [misconfigured] = [line for line in logs if line["event"] == "auth_misconfigured"]
    assert misconfigured["log_level"] == "error"
    bearer = _forged({"sub": "owner-1", "exp": int(time.time()) + 60})
    status, headers, _ = await export(http, base, site=world.site, bearer=bearer)
    assert (status, headers["x-opsmantik-error-code"]) == (503, "auth_misconfigured")
    # The rest of the gateway is up.
    async with http.get(f"{base}/healthz") as r:
        assert r.status == 200


async def test_tenant_role_cannot_read_another_sites_rows_through_the_query_path(
    world: World, db: asyncpg.Connection
) -> None:
    """The application's access check aside, RLS alone keeps another site's rows out of the export."""
    for user in ("other-owner", "stranger"):
        chunks: list[bytes] = []
        async with tenant_transaction(db, user):
            result = await write_export(db, world.site, MONTH, chunks.append)
            assert (
                await db.fetchval("SELECT count(*) FROM ingest_idempotency WHERE site_id = $1", world.site)
                == 0
            )
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await db.execute("SELECT count(*) FROM site_members")
        assert result.row_count == 0 and b"".join(chunks) == CSV_HEADER, user
    # The member sees its own site's rows through the same path (the test above is not vacuous).
    own: list[bytes] = []
    async with tenant_transaction(db, "other-owner"):
        mine = await write_export(db, world.other, MONTH, own.append)
    assert mine.row_count == 1
    # And the tenant role can write nothing, the audit log included.
    async with tenant_transaction(db, "owner-1", isolation="read_committed"):
        with pytest.raises(asyncpg.PostgresError):
            await db.execute(
                "INSERT INTO billing_audit_log (action, actor) VALUES ('dispute_export', 'tenant')"
            )


async def test_export_is_one_snapshot_under_concurrent_inserts(
    world: World, db: asyncpg.Connection, database_url: str
) -> None:
    """Rows committed while the export reads are not in it, and the hash covers exactly the bytes."""
    writer = await asyncpg.connect(database_url)
    try:
        chunks: list[bytes] = []

        def sink(chunk: bytes) -> None:
            chunks.append(chunk)

        async with tenant_transaction(db, "owner-1"):
            # A new row committed after the transaction's snapshot was taken (first query) stays out.
            await db.fetchval("SELECT 1 FROM invoice_snapshot LIMIT 1")
            await writer.execute(
                """INSERT INTO ingest_idempotency (site_id, idempotency_key, bucket_at, created_at)
                   VALUES ($1, $2, $3, $3)""",
                world.site,
                "1" * 64,
                month_start(MONTH) + timedelta(days=2),
            )
            result = await write_export(db, world.site, MONTH, sink, batch_rows=2)
        body = b"".join(chunks)
        assert body == expected_body()
        assert result.row_count == 5 and result.byte_count == len(body)
        assert result.export_hash == hashlib.sha256(body).hexdigest()
    finally:
        await writer.close()


REVKERNEL = str(Path(sys.executable).parent / "revkernel")


def test_revkernel_export_writes_the_same_bytes_and_prints_the_hash(
    settings: Settings, world: World, tmp_path: Path
) -> None:
    env = settings_env(settings)
    out = tmp_path / "dispute.csv"
    run = subprocess.run(
        [REVKERNEL, "export", "--site", "export-site", "--month", MONTH, "-o", str(out)],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == expected_body()
    assert run.stdout.decode().strip() == hashlib.sha256(expected_body()).hexdigest()
    assert b"rows=5" in run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["dispute.csv"]  # no temporary file left behind

    # To stdout, by UUID, as a member under RLS: the same bytes.
    as_owner = subprocess.run(
        [REVKERNEL, "export", "--site", str(world.site), "--month", MONTH, "--user", "owner-1"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert as_owner.returncode == 0, as_owner.stderr
    assert as_owner.stdout == expected_body()

    # A user the endpoint would refuse is refused here too, and nothing is written.
    refused_out = tmp_path / "refused.csv"
    for user in ("viewer-1", "other-owner"):
        refused = subprocess.run(
            [
                REVKERNEL,
                "export",
                "--site",
                "export-site",
                "--month",
                MONTH,
                "--user",
                user,
                "-o",
                str(refused_out),
            ],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert refused.returncode == 2 and b"forbidden" in refused.stderr, user
        assert not refused_out.exists()


@pytest.mark.parametrize(("database_role", "read_as"), [(None, "revkernel_service"), ("login", "login")])
async def test_cli_exports_are_audited(
    settings: Settings, world: World, db: asyncpg.Connection, database_role: str | None, read_as: str
) -> None:
    env = settings_env(settings)
    if database_role is not None:
        env["DATABASE_ROLE"] = database_role
    proc = await asyncio.create_subprocess_exec(
        REVKERNEL,
        "export",
        "--site",
        "export-site",
        "--month",
        MONTH,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr
    [audit] = await db.fetch("SELECT * FROM billing_audit_log WHERE action = 'dispute_export'")
    assert audit["actor"].startswith("cli:")
    assert audit["details"]["export_hash"] == hashlib.sha256(stdout).hexdigest()
    assert audit["details"]["role"] == read_as and audit["details"]["via"] == "cli"
    [line] = [json.loads(x) for x in stderr.splitlines() if b'"BILLING_DISPUTE_EXPORT"' in x]
    assert line["export_hash"] == audit["details"]["export_hash"] and line["row_count"] == 5
    assert line["site_id"] == str(world.site) and line["year_month"] == MONTH


async def test_revkernel_export_discloses_nothing_it_could_not_audit(
    settings: Settings, world: World, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Audit before disclosure, as the endpoint: with the audit insert refused, neither stdout nor the
    file gets a byte (the file used to be renamed into place, and stdout written, before the audit)."""
    await db.execute(
        """CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'audit log unavailable'; END $$;
           CREATE TRIGGER refuse_audit BEFORE INSERT ON billing_audit_log
           FOR EACH ROW EXECUTE FUNCTION refuse_audit();"""
    )
    env = settings_env(settings)
    out = tmp_path / "dispute.csv"
    for extra in (["-o", str(out)], []):
        run = await asyncio.to_thread(
            subprocess.run,
            [REVKERNEL, "export", "--site", "export-site", "--month", MONTH, *extra],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert run.returncode != 0 and b"audit log unavailable" in run.stderr
        assert run.stdout == b""
        assert os.listdir(tmp_path) == []  # noqa: ASYNC240


async def test_postgres_unreachable_is_503_after_the_auth_and_input_checks(
    settings: Settings, open_gateway: OpenGateway, http: aiohttp.ClientSession
) -> None:
    dead = settings.with_overrides(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    base = await open_gateway(dead)
    site = uuid.uuid4()
    status, headers, _ = await export(http, base, site=site, bearer=token("owner-1"))
    assert (status, headers["x-opsmantik-error-code"]) == (503, "database_unavailable")
    # Credentials and input are still judged first, without the database.
    assert (await export(http, base, site=site))[0] == 401
    assert (await export(http, base, site="nope", bearer=token("owner-1")))[0] == 400
