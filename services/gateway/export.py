"""`GET /api/billing/dispute-export` (SPEC §10): a site's idempotency rows of one month as CSV.

The rows are read under the tenant role (RLS) in one REPEATABLE READ transaction and spooled to an
unlinked temporary file while their SHA-256 is computed, so the hash header can precede the body
without holding the export in memory and the database connection is returned before the client's
(possibly slow) download starts. The file is then streamed in fixed-size chunks.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from typing import IO

import asyncpg
from aiohttp import web

from services.gateway.context import CONTEXT, request_id
from services.gateway.responses import error_response
from shared.auth import AuthError, AuthMisconfigured, bearer_token, verify_token
from shared.db import tenant_transaction
from shared.dispute_export import (
    ExportAccess,
    ExportResult,
    export_filename,
    read_export_access,
    record_export,
    write_export,
)
from shared.logging import get_logger
from shared.months import is_year_month

log = get_logger("gateway.export")

PATH = "/api/billing/dispute-export"
STREAM_CHUNK_BYTES = 256 * 1024
# Exports spooled at once per gateway process; more wait their turn (each holds a pool connection
# while it reads, and the ingest path shares that pool).
MAX_CONCURRENT_SPOOLS = 2
_DB_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

SPOOL_SLOTS = web.AppKey("export_spool_slots", asyncio.Semaphore)


class SpoolError(Exception):
    """The temporary file could not be written (disk full, no TMPDIR)."""


def _parse_site_id(raw: str | None) -> uuid.UUID | None:
    if not raw or len(raw) > 64:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None


async def _spool(
    request: web.Request, user_id: str, site_id: uuid.UUID, year_month: str
) -> tuple[IO[bytes], ExportResult]:
    """Read the export under the tenant role into an unlinked temporary file; return it rewound."""
    ctx = request.app[CONTEXT]
    try:
        spool = tempfile.TemporaryFile(prefix="dispute-export-")  # noqa: SIM115 - returned, closed by the caller
    except OSError as exc:
        raise SpoolError(str(exc)) from exc

    def sink(chunk: bytes) -> None:
        try:
            spool.write(chunk)
        except OSError as exc:
            raise SpoolError(str(exc)) from exc

    try:
        async with request.app[SPOOL_SLOTS], ctx.pool.acquire() as conn, tenant_transaction(conn, user_id):
            result = await write_export(conn, site_id, year_month, sink)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool, result


async def dispute_export(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    rid = request_id(request)
    try:
        principal = verify_token(ctx.settings, bearer_token(request.headers.get("Authorization")))
    except AuthMisconfigured:
        log.error(
            "auth_misconfigured", request_id=rid, detail="AUTH_JWT_SECRET missing or shorter than 32 bytes"
        )
        return error_response(503, "auth_misconfigured")
    except AuthError as exc:
        return error_response(401, "unauthorized", headers={"WWW-Authenticate": "Bearer"}, detail=str(exc))

    site_id = _parse_site_id(request.query.get("site_id"))
    if site_id is None:
        return error_response(400, "invalid_site_id", detail="site_id must be the site's UUID")
    year_month = request.query.get("year_month")
    if not is_year_month(year_month):
        return error_response(400, "invalid_year_month", detail="year_month must be YYYY-MM")
    assert year_month is not None

    try:
        access = await read_export_access(ctx.pool, principal.user_id, site_id)
    except _DB_ERRORS as exc:
        log.error("export_database_unavailable", request_id=rid, error=str(exc))
        return error_response(503, "database_unavailable")
    if access is ExportAccess.SITE_NOT_FOUND:
        return error_response(404, "site_not_found")
    if access is not ExportAccess.ALLOWED:
        return error_response(403, "forbidden")

    try:
        spool, result = await _spool(request, principal.user_id, site_id, year_month)
    except SpoolError as exc:
        log.error("export_spool_failed", request_id=rid, error=str(exc))
        return error_response(500, "export_failed")
    except _DB_ERRORS as exc:
        log.error("export_database_unavailable", request_id=rid, error=str(exc))
        return error_response(503, "database_unavailable")

    with spool:
        # The disclosure is on record before the first byte leaves: no audit row, no export.
        try:
            await asyncio.shield(
                record_export(
                    ctx.pool,
                    actor=f"user:{principal.user_id}",
                    site_id=site_id,
                    year_month=year_month,
                    request_id=rid,
                    result=result,
                    details={"via": "http"},
                )
            )
        except _DB_ERRORS as exc:
            log.error("export_audit_failed", request_id=rid, site_id=str(site_id), error=str(exc))
            return error_response(503, "database_unavailable")
        log.info(
            "BILLING_DISPUTE_EXPORT",
            request_id=rid,
            site_id=str(site_id),
            year_month=year_month,
            row_count=result.row_count,
            export_hash=result.export_hash,
            snapshot_hash=result.snapshot_hash,
            user_id=principal.user_id,
        )
        return await _stream(request, spool, result, site_id, year_month)


async def _stream(
    request: web.Request, spool: IO[bytes], result: ExportResult, site_id: uuid.UUID, year_month: str
) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    response = web.StreamResponse(status=200)
    response.content_type = "text/csv"
    response.charset = "utf-8"
    response.content_length = result.byte_count
    headers = response.headers
    headers["Content-Disposition"] = f'attachment; filename="{export_filename(site_id, year_month)}"'
    headers["Cache-Control"] = "no-store"
    headers["x-opsmantik-export-hash"] = result.export_hash
    headers["x-opsmantik-row-count"] = str(result.row_count)
    if result.snapshot_hash is not None:
        headers["x-opsmantik-snapshot-hash"] = result.snapshot_hash
    # The middleware adds these after the handler returns, which is too late for a streamed body.
    headers["x-opsmantik-commit"] = ctx.build.commit_sha
    headers["x-opsmantik-branch"] = ctx.build.git_branch
    headers["x-request-id"] = request_id(request)
    await response.prepare(request)
    try:
        while chunk := spool.read(STREAM_CHUNK_BYTES):
            await response.write(chunk)
        await response.write_eof()
    except ConnectionError as exc:
        # Already prepared: nothing else can be answered; the audit row says what was served.
        log.warning("export_client_disconnected", request_id=request_id(request), error=str(exc))
    return response


def setup(app: web.Application) -> None:
    app[SPOOL_SLOTS] = asyncio.Semaphore(MAX_CONCURRENT_SPOOLS)
    # No HEAD: a streamed body cannot be withheld from a HEAD answer (it desynchronised kept-alive
    # connections) and an export is audited as a disclosure; HEAD answers 405.
    app.router.add_get(PATH, dispute_export, allow_head=False)
