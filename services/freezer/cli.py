"""`revkernel freezer`, `revkernel freeze`, `revkernel retention` (SPEC §13)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import uuid
from typing import Any

import asyncpg

from services.cli import CliError, run_async
from services.cli_types import positive_float, positive_int, print_json, year_month
from services.freezer.main import Freezer, FreezerConfig
from shared.buildinfo import resolve_build_info
from shared.db import create_pool
from shared.freeze import FreezeRefused, freeze_month
from shared.retention import RetentionSettings, run_retention
from shared.settings import Settings
from shared.worker import run_worker


def cmd_freezer(args: argparse.Namespace, settings: Settings) -> int:
    config = FreezerConfig(
        freeze_check_interval_s=args.freeze_check_interval,
        retention_interval_s=args.retention_interval,
        freeze_chunk_sites=args.freeze_chunk_sites,
        freeze_catch_up_months=args.freeze_catch_up_months,
    )
    freezer = Freezer(settings, config)
    if args.burst:
        handled = run_async(freezer.worker.burst())
        print(f"freezer burst: {handled} command(s) processed", file=sys.stderr)
        return 0
    return run_worker(freezer.worker)


async def _pool(settings: Settings) -> asyncpg.Pool:
    try:
        return await create_pool(settings.database_url, min_size=1, max_size=10, role=settings.database_role)
    except (OSError, asyncpg.PostgresError) as exc:
        raise CliError(f"cannot reach Postgres: {exc}") from exc


def cmd_freeze(args: argparse.Namespace, settings: Settings) -> int:
    """Freeze now, in this process (no worker needed); prints the SPEC §9 body."""

    async def go() -> dict[str, Any]:
        pool = await _pool(settings)
        request_id = uuid.uuid4().hex
        try:
            result = await freeze_month(
                pool,
                args.month,
                commit_sha=resolve_build_info(settings).commit_sha,
                generated_by=f"cli:{socket.gethostname()}:{os.getpid()}",
                request_id=request_id,
                trigger="cli",
            )
        except FreezeRefused as exc:
            raise CliError(f"{exc.code}: {exc.reason}") from None
        finally:
            await pool.close()
        return {**result.reply(), "request_id": request_id}

    print_json(run_async(go()))
    return 0


def cmd_retention(args: argparse.Namespace, settings: Settings) -> int:
    """Partition maintenance and retention once, now; prints what was removed."""

    async def go() -> dict[str, Any]:
        pool = await _pool(settings)
        try:
            async with pool.acquire() as conn:
                report = await run_retention(
                    conn,
                    RetentionSettings(batch_rows=args.batch_rows),
                    actor=f"cli:{socket.gethostname()}:{os.getpid()}",
                )
        finally:
            await pool.close()
        return {"ok": True, **report.as_dict()}

    print_json(run_async(go()))
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    defaults = FreezerConfig()
    p = sub.add_parser("freezer", help="run the freezer worker (invoice freeze, partitions, retention)")
    p.add_argument("--burst", action="store_true", help="process queued commands, run schedules once, exit")
    p.add_argument(
        "--freeze-check-interval",
        type=positive_float,
        default=defaults.freeze_check_interval_s,
        help="seconds between checks that the previous month is frozen",
    )
    p.add_argument(
        "--freeze-catch-up-months",
        type=positive_int,
        default=defaults.freeze_catch_up_months,
        help="at start-up, freeze every closed month this far back that some site with rows lacks",
    )
    p.add_argument(
        "--retention-interval",
        type=positive_float,
        default=defaults.retention_interval_s,
        help="seconds between retention runs",
    )
    p.add_argument(
        "--freeze-chunk-sites",
        type=positive_int,
        default=defaults.freeze_chunk_sites,
        help="sites reconciled and snapshotted per transaction",
    )
    p.set_defaults(handler=cmd_freezer)

    p = sub.add_parser("freeze", help="freeze a past month into invoice snapshots now and print JSON")
    p.add_argument("--month", type=year_month, help="YYYY-MM, a past month (default: the previous UTC month)")
    p.set_defaults(handler=cmd_freeze)

    p = sub.add_parser(
        "retention", help="partition maintenance and retention once, now; print what was removed"
    )
    p.add_argument("--batch-rows", type=positive_int, default=RetentionSettings().batch_rows)
    p.set_defaults(handler=cmd_retention)
