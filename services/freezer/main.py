"""The freezer process: freeze commands, the monthly freeze on its own schedule, partition maintenance
and retention.

Commands (queue `freezer.commands`; replies are SPEC §9 bodies without `request_id`, which the gateway
adds): `freeze` (`{year_month?}`; the current or a future month is rejected with a 400 reply) and
`retention` (partition maintenance + retention now; the report).
Schedules: the freeze check every minute (it freezes the previous month once 00:10 UTC of the 1st has
passed; at start-up, every month of the last year left unfrozen, oldest first), retention daily and at
start-up.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.amqp import FREEZER_QUEUE
from shared.buildinfo import resolve_build_info
from shared.commands import CommandRejected, CommandRequest
from shared.freeze import FreezeRefused, FreezeResult, freezable_month, freeze_month, scheduled_freeze_month
from shared.freeze import unfrozen_site_count as count_unfrozen
from shared.logging import get_logger
from shared.months import add_months
from shared.retention import RetentionReport, RetentionSettings, run_retention
from shared.settings import Settings
from shared.worker import Schedule, Worker

log = get_logger("freezer")


@dataclass(frozen=True, slots=True)
class FreezerConfig:
    """Process knobs beyond Settings (CLI flags; tests shorten them)."""

    freeze_check_interval_s: float = 60.0
    # How far back the first freeze check of a process looks for closed months left unfrozen (a freezer
    # that was down, or a month whose freeze failed); 1 = only the month that should be frozen by now.
    freeze_catch_up_months: int = 12
    retention_interval_s: float = 86_400.0
    # While a retention run stopped at its per-run bound, the next one follows after this long.
    retention_busy_interval_s: float = 60.0
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    freeze_chunk_sites: int = 500
    # A freeze of many sites is one command; give it time to finish on SIGTERM.
    drain_timeout_s: float = 60.0
    http_port: int | None = None  # None: FREEZER_HTTP_PORT
    worker_id: str = field(default_factory=lambda: f"freezer:{socket.gethostname()}:{os.getpid()}")


class Freezer:
    """Wires the freezer's commands and schedules onto a `Worker`."""

    def __init__(self, settings: Settings, config: FreezerConfig | None = None) -> None:
        self.settings = settings
        self.config = config or FreezerConfig()
        self.commit_sha = resolve_build_info(settings).commit_sha
        self.worker = Worker(
            name="freezer",
            settings=settings,
            command_queue=FREEZER_QUEUE,
            http_port=settings.freezer_http_port if self.config.http_port is None else self.config.http_port,
            prefetch=1,
            drain_timeout_s=self.config.drain_timeout_s,
        )
        # The last month the schedule found fully frozen: it is not checked again until the next one.
        self.frozen_through: str | None = None
        # Set once the first freeze check has ended (done or failed): the first retention run waits for
        # it, so months left unfrozen are invoiced before retention looks at their rows. (Retention
        # never removes a billable row that no snapshot counted; waiting lets it remove them today.)
        self.first_freeze_check_ended = asyncio.Event()
        w = self.worker
        w.command("freeze", self._cmd_freeze)
        w.command("retention", self._cmd_retention)
        w.schedule(
            Schedule("invoice-freeze", self.freeze_schedule, interval_s=self.config.freeze_check_interval_s)
        )
        w.schedule(
            Schedule(
                "retention",
                self.retention_schedule,
                interval_s=self.config.retention_interval_s,
                busy_interval_s=self.config.retention_busy_interval_s,
            )
        )

    # ------------------------------------------------------------------------------ work

    async def freeze(self, year_month: str | None, *, request_id: str, trigger: str) -> FreezeResult:
        return await freeze_month(
            self.worker.pool,
            year_month,
            commit_sha=self.commit_sha,
            generated_by=self.config.worker_id,
            request_id=request_id,
            trigger=trigger,
            chunk_sites=self.config.freeze_chunk_sites,
        )

    async def freeze_schedule(self, now: datetime | None = None) -> bool:
        """Freeze, oldest first, every closed month in which some site with rows has no snapshot yet:
        at the first check the last `freeze_catch_up_months` months, then each month as it closes."""
        try:
            return await self._freeze_due_months(now or datetime.now(UTC))
        finally:
            self.first_freeze_check_ended.set()

    async def _freeze_due_months(self, now: datetime) -> bool:
        due = scheduled_freeze_month(now)
        if due == self.frozen_through:
            return False
        month = (  # the oldest month to check
            add_months(due, 1 - self.config.freeze_catch_up_months)
            if self.frozen_through is None
            else add_months(self.frozen_through, 1)
        )
        while month <= due:
            unfrozen = await count_unfrozen(self.worker.pool, month)
            if unfrozen:
                log.info("freeze_due", year_month=month, unfrozen_sites=unfrozen)
                await self.freeze(month, request_id=uuid.uuid4().hex, trigger="schedule")
            month = add_months(month, 1)
        self.frozen_through = due
        return False

    async def retention(self) -> RetentionReport:
        async with self.worker.pool.acquire() as conn:
            return await run_retention(conn, self.config.retention, actor=self.config.worker_id)

    async def retention_schedule(self) -> bool:
        """Partition maintenance and retention; True (run again soon) when a run stopped at its bound."""
        await self.first_freeze_check_ended.wait()
        return (await self.retention()).more_pending

    # ------------------------------------------------------------------------------ commands

    async def _cmd_freeze(self, request: CommandRequest) -> dict[str, Any]:
        try:
            month = freezable_month(request.args.get("year_month"))
            result = await self.freeze(month, request_id=request.request_id, trigger="command")
        except FreezeRefused as exc:
            raise CommandRejected(exc.code, reason=exc.reason) from exc
        return result.reply()

    async def _cmd_retention(self, request: CommandRequest) -> dict[str, Any]:
        return {"ok": True, **(await self.retention()).as_dict()}
