"""`revkernel export --site ID --month M [-o FILE] [--user U]`: the dispute export, byte for byte the body
the HTTP endpoint serves (SPEC §10, §13), for operators.

Identity (docs/freeze-and-export.md): by default the read runs as the fleet's role `revkernel_service`
(an operator tool, all sites visible, still read-only and one REPEATABLE READ snapshot); with
`--user U` it runs exactly as the endpoint does for that user: the same access decision, then the
tenant role with row-level security. Either way the export is appended to the audit log.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg

from services.cli import CliError, run_async
from services.cli_types import year_month
from shared.db import connect, tenant_transaction
from shared.dispute_export import ExportAccess, ExportResult, read_export_access, record_export, write_export
from shared.logging import get_logger
from shared.queries import query
from shared.settings import LOGIN_ROLE, Settings
from shared.sites import SiteNotFound, resolve_site

log = get_logger("export")


@contextlib.asynccontextmanager
async def service_read_transaction(
    conn: asyncpg.Connection, role: str | None
) -> AsyncIterator[asyncpg.Connection]:
    """Read-only REPEATABLE READ as the fleet's role (no tenant filter; no superuser rights either);
    `role` None: as the login user (DATABASE_ROLE=login)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if role is not None:
            await conn.execute(query("export_set_role"), role)
        yield conn


async def _export(
    conn: asyncpg.Connection, settings: Settings, args: argparse.Namespace, out: BinaryIO
) -> tuple[Any, ExportResult]:
    try:
        site = await resolve_site(conn, args.site, settings.default_monthly_limit)
    except SiteNotFound as exc:
        raise CliError(str(exc)) from None
    if args.user:
        access = await read_export_access(conn, args.user, site.id)
        if access is not ExportAccess.ALLOWED:
            raise CliError(f"user {args.user!r} may not export site {site.id} ({access.value})")
        async with tenant_transaction(conn, args.user):
            result = await write_export(conn, site.id, args.month, out.write)
    else:
        async with service_read_transaction(conn, settings.database_role):
            result = await write_export(conn, site.id, args.month, out.write)
    return site, result


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    operator = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    actor = f"{operator} as user:{args.user}" if args.user else operator
    read_as = "tenant" if args.user else settings.database_role or LOGIN_ROLE

    async def go() -> ExportResult:
        # Spooled, audited, then disclosed (as the endpoint does): nothing reaches stdout or the file's
        # name unless the audit row was written first. A file is spooled beside its target and
        # renamed into place, so no half-written file ever carries its name.
        target = Path(args.output) if args.output is not None else None
        fd, spool_name = tempfile.mkstemp(
            prefix=f".{target.name}." if target else ".revkernel-export.",
            dir=target.parent if target else None,
        )
        try:
            with os.fdopen(fd, "w+b") as spool:
                result = await _export_and_audit(spool)
                if target is None:
                    spool.seek(0)
                    shutil.copyfileobj(spool, sys.stdout.buffer)
                    sys.stdout.buffer.flush()
            if target is not None:
                os.replace(spool_name, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool_name)
        return result

    async def _export_and_audit(spool: BinaryIO) -> ExportResult:
        try:
            conn = await connect(settings.database_url)
        except (OSError, asyncpg.PostgresError) as exc:
            raise CliError(f"cannot reach Postgres: {exc}") from exc
        try:
            site, result = await _export(conn, settings, args, spool)
            await record_export(
                conn,
                actor=actor,
                site_id=site.id,
                year_month=args.month,
                request_id=None,
                result=result,
                details={"via": "cli", "role": read_as},
            )
        finally:
            await conn.close()
        log.info(
            "BILLING_DISPUTE_EXPORT",
            site_id=str(site.id),
            year_month=args.month,
            row_count=result.row_count,
            export_hash=result.export_hash,
            snapshot_hash=result.snapshot_hash,
            user_id=args.user,
            actor=actor,
        )
        return result

    try:
        result = run_async(go())
    except (OSError, asyncpg.PostgresError) as exc:
        raise CliError(f"export failed: {exc}") from exc
    summary = f"rows={result.row_count} bytes={result.byte_count} export_hash={result.export_hash}"
    if result.snapshot_hash is not None:
        summary += f" snapshot_hash={result.snapshot_hash}"
    print(summary, file=sys.stderr)
    if args.output is not None:
        print(result.export_hash)
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "export",
        help="write a site's dispute export CSV for a month (to FILE or stdout) and print its SHA-256",
    )
    p.add_argument("--site", required=True, help="site UUID or public id")
    p.add_argument("--month", type=year_month, required=True, help="YYYY-MM")
    p.add_argument("-o", "--output", help="file to write (default: stdout; the hash then goes to stderr)")
    p.add_argument("--user", help="export as this user would over HTTP (tenant role, RLS, same access check)")
    p.set_defaults(handler=cmd_export)
