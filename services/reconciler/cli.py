"""`revkernel reconciler`, `revkernel reconcile`, `revkernel backfill` (SPEC §13)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import asyncpg
import orjson

from services.cli import CliError, run_async
from services.reconciler.main import Reconciler, ReconcilerConfig
from services.reconciler.recovery import RecoverySettings
from shared.db import create_pool
from shared.months import current_year_month, is_year_month
from shared.queries import query
from shared.reconciliation import (
    BackfillInvalid,
    JobSettings,
    backfill_jobs,
    parse_backfill_request,
    reconcile_month,
)
from shared.redis_client import create_redis
from shared.settings import Settings
from shared.sites import SiteNotFound, resolve_site
from shared.worker import run_worker


def _month(raw: str) -> str:
    if not is_year_month(raw):
        raise argparse.ArgumentTypeError(f"not a YYYY-MM month: {raw!r}")
    return raw


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def config_from_args(args: argparse.Namespace) -> ReconcilerConfig:
    jobs = JobSettings(lease_s=args.lease_seconds, retry_base_s=args.retry_base_seconds)
    recovery = RecoverySettings(lease_s=args.recovery_lease_seconds, batch_size=args.recovery_batch)
    return ReconcilerConfig(
        jobs=jobs,
        recovery=recovery,
        reconcile_interval_s=args.reconcile_interval,
        recovery_interval_s=args.recovery_interval,
    )


def cmd_reconciler(args: argparse.Namespace, settings: Settings) -> int:
    reconciler = Reconciler(settings, config_from_args(args))
    if args.burst:
        handled = run_async(reconciler.worker.burst())
        print(f"reconciler burst: {handled} command(s) processed", file=sys.stderr)
        return 0
    return run_worker(reconciler.worker)


async def _with_clients(settings: Settings, work: Any) -> Any:
    try:
        pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    except (OSError, asyncpg.PostgresError) as exc:
        raise CliError(f"cannot reach Postgres: {exc}") from exc
    redis = create_redis(settings.redis_url, timeout_s=1.0)
    try:
        return await work(pool, redis)
    finally:
        await redis.aclose()
        await pool.close()


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    month = args.month or current_year_month()

    async def work(pool: asyncpg.Pool, redis: Any) -> Any:
        if args.site:
            try:
                site_ids = [(await resolve_site(pool, args.site)).id]
            except SiteNotFound as exc:
                raise CliError(str(exc)) from None
        else:
            rows = await pool.fetch(query("reconcile_sites_with_rows_in_months"), [month])
            site_ids = [r["id"] for r in rows]
        results = [(await reconcile_month(pool, redis, site_id, month)).as_dict() for site_id in site_ids]
        return {"ok": True, "year_month": month, "sites": len(results), "results": results}

    _print_json(run_async(_with_clients(settings, work)))
    return 0


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool, redis: Any) -> Any:
        body: dict[str, Any] = {"from": args.from_month, "to": args.to_month}
        if args.site:
            try:
                body["site_id"] = str((await resolve_site(pool, args.site)).id)
            except SiteNotFound as exc:
                raise CliError(str(exc)) from None
        try:
            result = await backfill_jobs(pool, parse_backfill_request(body))
        except BackfillInvalid as exc:
            raise CliError(f"{exc.code}: {exc.reason}") from None
        return {"ok": True, "enqueued": result.enqueued, "months": result.months, "sites": result.sites}

    _print_json(run_async(_with_clients(settings, work)))
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    jobs, recovery = JobSettings(), RecoverySettings()
    p = sub.add_parser("reconciler", help="run the reconciler worker")
    p.add_argument("--burst", action="store_true", help="process queued commands, run schedules once, exit")
    p.add_argument("--lease-seconds", type=_positive_float, default=jobs.lease_s)
    p.add_argument("--retry-base-seconds", type=_positive_float, default=jobs.retry_base_s)
    p.add_argument("--recovery-lease-seconds", type=_positive_float, default=recovery.lease_s)
    p.add_argument("--recovery-batch", type=int, default=recovery.batch_size)
    p.add_argument("--reconcile-interval", type=_positive_float, default=300.0, help="seconds")
    p.add_argument("--recovery-interval", type=_positive_float, default=2.0, help="seconds")
    p.set_defaults(handler=cmd_reconciler)

    p = sub.add_parser("reconcile", help="reconcile a month now (all active sites, or one) and print JSON")
    p.add_argument("--site", help="site UUID or public id (default: every site with rows in the month)")
    p.add_argument("--month", type=_month, help="YYYY-MM (default: the current UTC month)")
    p.set_defaults(handler=cmd_reconcile)

    p = sub.add_parser("backfill", help="queue reconciliation jobs for past months (only missing ones)")
    p.add_argument("--from", dest="from_month", type=_month, required=True)
    p.add_argument("--to", dest="to_month", type=_month, required=True)
    p.add_argument("--site", help="site UUID or public id (default: sites with rows in the range)")
    p.set_defaults(handler=cmd_backfill)
