"""The reconciler process: reconciliation commands, the job table on its own schedule, fallback recovery.

Commands (queue `reconciler.commands`; replies are the SPEC §8 bodies without `request_id`, which the
gateway adds): `reconcile_usage` (enqueue, then run), `enqueue`, `run` (`{limit?}`), `backfill`
(`{site_id?, from, to}`), `reconcile` (`{site_id, year_month}`), `recover` (one recovery batch).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.reconciler.recovery import RecoverySettings, recover_batch
from shared.amqp import RECONCILER_QUEUE
from shared.billing_counters import BillingCounters
from shared.commands import CommandRejected, CommandRequest
from shared.logging import get_logger
from shared.months import current_year_month, is_year_month
from shared.publisher import EventPublisher
from shared.queries import query
from shared.reconciliation import (
    BackfillInvalid,
    JobSettings,
    backfill_jobs,
    enqueue_jobs,
    job_counts_reply,
    parse_backfill_request,
    reconcile_month,
    run_jobs,
)
from shared.settings import Settings
from shared.worker import Schedule, Worker

log = get_logger("reconciler")


@dataclass(frozen=True, slots=True)
class ReconcilerConfig:
    """Process knobs beyond Settings (CLI flags; tests shorten the leases)."""

    jobs: JobSettings = field(default_factory=JobSettings)
    recovery: RecoverySettings = field(default_factory=RecoverySettings)
    schedules: bool = True  # False: commands only (tests that count what one command did)
    reconcile_interval_s: float = 300.0
    recovery_interval_s: float = 2.0
    drain_timeout_s: float = 20.0
    prefetch: int = 2
    http_port: int | None = None  # None: RECONCILER_HTTP_PORT
    worker_id: str = field(default_factory=lambda: f"reconciler-{socket.gethostname()}-{os.getpid()}")


class Reconciler:
    """Wires the reconciler's commands and schedules onto a `Worker`."""

    def __init__(self, settings: Settings, config: ReconcilerConfig = ReconcilerConfig()) -> None:
        self.settings = settings
        self.config = config
        self.worker = Worker(
            name="reconciler",
            settings=settings,
            command_queue=RECONCILER_QUEUE,
            http_port=settings.reconciler_http_port if config.http_port is None else config.http_port,
            prefetch=config.prefetch,
            drain_timeout_s=config.drain_timeout_s,
        )
        self.publisher = EventPublisher(settings.amqp_url, timeout_ms=settings.publish_timeout_ms)
        self.counters: BillingCounters | None = None
        w = self.worker
        w.on_start.append(self._open)
        w.on_stop.append(self._close)
        w.command("reconcile_usage", self._cmd_reconcile_usage)
        w.command("enqueue", self._cmd_enqueue)
        w.command("run", self._cmd_run)
        w.command("backfill", self._cmd_backfill)
        w.command("reconcile", self._cmd_reconcile)
        w.command("recover", self._cmd_recover)
        if config.schedules:
            w.schedule(Schedule("reconcile", self.reconcile_schedule, interval_s=config.reconcile_interval_s))
            w.schedule(
                Schedule(
                    "fallback-recovery", self.recovery_schedule, config.recovery_interval_s, busy_interval_s=0
                )
            )
        w.side_task("billing-counters", self._flush_counters)

    async def _open(self, worker: Worker) -> None:
        self.counters = BillingCounters(worker.redis)
        await self.publisher.start()

    async def _close(self, worker: Worker) -> None:
        await self.publisher.close()
        if self.counters is not None:
            await self.counters.close()

    async def _flush_counters(self) -> None:
        assert self.counters is not None
        await self.counters.run()

    # ------------------------------------------------------------------------------ work

    async def run_due_jobs(self, limit: int | None = None) -> Any:
        return await run_jobs(
            self.worker.pool,
            self.worker.redis,
            limit=limit,
            worker_id=self.config.worker_id,
            settings=self.config.jobs,
            counters=self.counters,
        )

    async def reconcile_schedule(self) -> bool:
        """Every 5 minutes: enqueue the open months, then run until nothing due is left."""
        enqueued = await enqueue_jobs(self.worker.pool, settings=self.config.jobs)
        limit = self.config.jobs.run_limit
        processed = 0
        while True:
            result = await self.run_due_jobs(limit)
            processed += result.processed
            if result.processed < limit:
                break
        log.info(
            "reconcile_schedule_done", enqueued=enqueued.enqueued, sites=enqueued.sites, processed=processed
        )
        return False

    async def recovery_schedule(self) -> bool:
        """One recovery batch; True (run again at once) when the batch was full."""
        result = await recover_batch(self.worker.pool, self.publisher, self.config.recovery)
        return result.claimed >= self.config.recovery.batch_size

    # ------------------------------------------------------------------------------ commands

    async def _cmd_reconcile_usage(self, request: CommandRequest) -> dict[str, Any]:
        enqueued = await enqueue_jobs(self.worker.pool, settings=self.config.jobs)
        run = await self.run_due_jobs(_limit(request.args, self.config.jobs.run_limit))
        return job_counts_reply(enqueued, run)

    async def _cmd_enqueue(self, request: CommandRequest) -> dict[str, Any]:
        enqueued = await enqueue_jobs(self.worker.pool, settings=self.config.jobs)
        return {**job_counts_reply(enqueued, None), "sites": enqueued.sites}

    async def _cmd_run(self, request: CommandRequest) -> dict[str, Any]:
        run = await self.run_due_jobs(_limit(request.args, self.config.jobs.run_limit))
        return job_counts_reply(None, run)

    async def _cmd_backfill(self, request: CommandRequest) -> dict[str, Any]:
        try:
            backfill = parse_backfill_request(request.args)
            result = await backfill_jobs(self.worker.pool, backfill)
        except BackfillInvalid as exc:
            raise CommandRejected(exc.code, reason=exc.reason) from exc
        await self.worker.pool.execute(
            query("insert_audit"),
            "reconcile_backfill",
            "cron",
            backfill.site_id,
            None,
            request.request_id,
            {
                "from": backfill.months[0],
                "to": backfill.months[-1],
                "enqueued": result.enqueued,
                "sites": result.sites,
            },
        )
        return {"ok": True, "enqueued": result.enqueued, "months": result.months, "sites": result.sites}

    async def _cmd_reconcile(self, request: CommandRequest) -> dict[str, Any]:
        month = request.args.get("year_month") or current_year_month()
        if not is_year_month(month):
            raise CommandRejected("invalid_month", reason="`year_month` must be a YYYY-MM month")
        try:
            site_id = uuid.UUID(str(request.args.get("site_id")))
        except ValueError:
            raise CommandRejected("invalid_site_id", reason="`site_id` must be a UUID") from None
        if not await self.worker.pool.fetchval(query("reconcile_site_exists"), site_id):
            raise CommandRejected("unknown_site", reason="no site with that site_id")
        result = await reconcile_month(
            self.worker.pool,
            self.worker.redis,
            site_id,
            month,
            lock_timeout_ms=self.config.jobs.lock_timeout_ms,
        )
        return {"ok": True, **result.as_dict()}

    async def _cmd_recover(self, request: CommandRequest) -> dict[str, Any]:
        result = await recover_batch(self.worker.pool, self.publisher, self.config.recovery)
        return {"ok": True, **result.as_dict()}


def _limit(args: Any, default: int) -> int:
    raw = args.get("limit", default) if hasattr(args, "get") else default
    if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= 1000:
        raise CommandRejected("invalid_limit", reason="`limit` must be an integer from 1 to 1000")
    return raw
