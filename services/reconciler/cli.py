"""`revkernel reconciler`, `revkernel reconcile`, `revkernel backfill` (SPEC §13).

Module-level imports stay light (every `revkernel` invocation builds the whole parser); the worker,
database and broker modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from services.cli import CliError, run_async
from services.cli_types import positive_float, positive_int, print_json, year_month
from shared.months import current_year_month
from shared.settings import Settings

if TYPE_CHECKING:
    import asyncpg

    from services.reconciler.main import ReconcilerConfig


def config_from_args(args: argparse.Namespace) -> ReconcilerConfig:
    """ReconcilerConfig from the flags; a flag left out keeps the documented default."""
    from dataclasses import replace

    from services.reconciler.main import ReconcilerConfig
    from services.reconciler.recovery import RecoverySettings
    from shared.reconciliation import JobSettings

    def given(**values: Any) -> dict[str, Any]:
        return {k: v for k, v in values.items() if v is not None}

    config = ReconcilerConfig()
    return replace(
        config,
        jobs=replace(
            JobSettings(), **given(lease_s=args.lease_seconds, retry_base_s=args.retry_base_seconds)
        ),
        recovery=replace(
            RecoverySettings(), **given(lease_s=args.recovery_lease_seconds, batch_size=args.recovery_batch)
        ),
        **given(reconcile_interval_s=args.reconcile_interval, recovery_interval_s=args.recovery_interval),
    )


def cmd_reconciler(args: argparse.Namespace, settings: Settings) -> int:
    from services.reconciler.main import Reconciler
    from shared.worker import run_worker

    reconciler = Reconciler(settings, config_from_args(args))
    if args.burst:
        handled = run_async(reconciler.worker.burst())
        print(f"reconciler burst: {handled} command(s) processed", file=sys.stderr)
        return 0
    return run_worker(reconciler.worker)


async def _with_clients(settings: Settings, work: Any) -> Any:
    import asyncpg

    from shared.db import create_pool
    from shared.redis_client import create_redis

    try:
        pool = await create_pool(settings.database_url, min_size=1, max_size=4, role=settings.database_role)
    except (OSError, asyncpg.PostgresError) as exc:
        raise CliError(f"cannot reach Postgres: {exc}") from exc
    redis = create_redis(settings.redis_url, timeout_s=1.0)
    try:
        return await work(pool, redis)
    finally:
        await redis.aclose()
        await pool.close()


async def _site_id(pool: asyncpg.Pool, ref: str) -> Any:
    from shared.sites import SiteNotFound, resolve_site

    try:
        return (await resolve_site(pool, ref)).id
    except SiteNotFound as exc:
        raise CliError(str(exc)) from None


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from shared.queries import query
    from shared.reconciliation import reconcile_month

    month = args.month or current_year_month()

    async def work(pool: asyncpg.Pool, redis: Any) -> Any:
        if args.site:
            site_ids = [await _site_id(pool, args.site)]
        else:
            rows = await pool.fetch(query("reconcile_sites_with_rows_in_months"), [month])
            site_ids = [r["id"] for r in rows]
        results = [(await reconcile_month(pool, redis, site_id, month)).as_dict() for site_id in site_ids]
        return {"ok": True, "year_month": month, "sites": len(results), "results": results}

    print_json(run_async(_with_clients(settings, work)))
    return 0


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from shared.reconciliation import BackfillInvalid, backfill_jobs, parse_backfill_request

    async def work(pool: asyncpg.Pool, redis: Any) -> Any:
        body: dict[str, Any] = {"from": args.from_month, "to": args.to_month}
        if args.site:
            body["site_id"] = str(await _site_id(pool, args.site))
        try:
            result = await backfill_jobs(pool, parse_backfill_request(body))
        except BackfillInvalid as exc:
            raise CliError(f"{exc.code}: {exc.reason}") from None
        return {"ok": True, "enqueued": result.enqueued, "months": result.months, "sites": result.sites}

    print_json(run_async(_with_clients(settings, work)))
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("reconciler", help="run the reconciler worker")
    p.add_argument("--burst", action="store_true", help="process queued commands, run schedules once, exit")
    p.add_argument("--lease-seconds", type=positive_float, help="job lease (default 300)")
    p.add_argument("--retry-base-seconds", type=positive_float, help="first job retry delay (default 30)")
    p.add_argument("--recovery-lease-seconds", type=positive_float, help="buffer claim lease (default 60)")
    p.add_argument("--recovery-batch", type=positive_int, help="buffer rows per claim (default 100)")
    p.add_argument("--reconcile-interval", type=positive_float, help="seconds (default 300)")
    p.add_argument("--recovery-interval", type=positive_float, help="seconds (default 2)")
    p.set_defaults(handler=cmd_reconciler)

    p = sub.add_parser("reconcile", help="reconcile a month now (all active sites, or one) and print JSON")
    p.add_argument("--site", help="site UUID or public id (default: every site with rows in the month)")
    p.add_argument("--month", type=year_month, help="YYYY-MM (default: the current UTC month)")
    p.set_defaults(handler=cmd_reconcile)

    p = sub.add_parser("backfill", help="queue reconciliation jobs for past months (only missing ones)")
    p.add_argument("--from", dest="from_month", type=year_month, required=True)
    p.add_argument("--to", dest="to_month", type=year_month, required=True)
    p.add_argument("--site", help="site UUID or public id (default: sites with rows in the range)")
    p.set_defaults(handler=cmd_backfill)
