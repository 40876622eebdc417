"""Retention and partition maintenance of `ingest_idempotency` and the fallback buffer (SPEC §7).

Which month partitions are candidates is a pure decision (older than the previous UTC month); the
database functions of migrations/0020_retention.sql re-check every guard with the server's clock and
do the DDL with the owner's rights, so the fleet's role needs no DDL grant and a wrong caller cannot
remove an unexpired row. Each batch is its own transaction.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from shared.logging import get_logger
from shared.months import add_months, current_year_month, format_year_month
from shared.queries import query

log = get_logger("retention")

DEFAULT_PARTITION = "ingest_idempotency_default"
AUDIT_ACTION = "retention"
_MONTH_PARTITION = re.compile(r"^ingest_idempotency_p(\d{4})_(0[1-9]|1[0-2])$")


def partition_month(name: str) -> str | None:
    """`YYYY-MM` of a month partition's name (`ingest_idempotency_p2026_01`), else None."""
    match = _MONTH_PARTITION.match(name)
    return None if match is None else format_year_month(int(match.group(1)), int(match.group(2)))


def retention_candidates(partition_names: Iterable[str], now: datetime | None = None) -> list[str]:
    """Month partitions older than the previous UTC month, oldest first: the only ones retention may
    drop or trim (the current and previous month are never touched)."""
    floor = add_months(current_year_month(now or datetime.now(UTC)), -1)
    months = {name: partition_month(name) for name in partition_names}
    return sorted(
        (name for name, month in months.items() if month is not None and month < floor),
        key=lambda name: months[name] or "",
    )


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    batch_rows: int = 10_000
    # Bound on one run's work per partition; what is left is picked up by the next run.
    max_batches_per_partition: int = 500
    recovered_fallback_days: int = 30


@dataclass(slots=True)
class RetentionReport:
    ran: bool = True
    partitions_created: int = 0
    dropped: list[str] = field(default_factory=list)
    trimmed: dict[str, int] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    # Expired partitions left whole because a billable row of theirs is in no invoice snapshot yet.
    unfrozen: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    fallback_purged: int = 0
    more_pending: bool = False

    @property
    def removed_anything(self) -> bool:
        return bool(self.dropped or self.trimmed or self.fallback_purged)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "partitions_created": self.partitions_created,
            "dropped_partitions": list(self.dropped),
            "trimmed_rows": dict(self.trimmed),
            "trimmed_total": sum(self.trimmed.values()),
            "partitions_with_unexpired_rows": list(self.kept),
            "partitions_with_unfrozen_rows": list(self.unfrozen),
            "busy_partitions": list(self.busy),
            "fallback_recovered_purged": self.fallback_purged,
            "more_pending": self.more_pending,
        }


async def ensure_partitions(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """Partitions of the current and next two months exist; how many were created now."""
    return int(await conn.fetchval(query("retention_ensure_partitions")))


async def _trim(
    conn: asyncpg.Connection, partition: str, settings: RetentionSettings
) -> tuple[int, bool, bool]:
    """Delete expired rows of one partition batch by batch; (rows deleted, bound reached, busy)."""
    total = 0
    for _ in range(settings.max_batches_per_partition):
        try:
            deleted = int(
                await conn.fetchval(query("retention_trim_partition"), partition, settings.batch_rows)
            )
        except asyncpg.LockNotAvailableError:
            return total, False, True
        total += deleted
        if deleted < settings.batch_rows:
            return total, False, False
    return total, True, False


async def _purge_fallback(conn: asyncpg.Connection, settings: RetentionSettings) -> tuple[int, bool]:
    total = 0
    for _ in range(settings.max_batches_per_partition):
        purged = int(
            await conn.fetchval(
                query("retention_purge_recovered_fallback"),
                settings.recovered_fallback_days,
                settings.batch_rows,
            )
        )
        total += purged
        if purged < settings.batch_rows:
            return total, False
    return total, True


async def run_retention(
    conn: asyncpg.Connection, settings: RetentionSettings | None = None, *, actor: str = "retention"
) -> RetentionReport:
    """Partition maintenance, then: drop wholly expired partitions older than the previous month, trim
    the expired rows of partly expired ones (and of the DEFAULT partition), never a billable row that no
    invoice snapshot has counted (migrations/0024), purge RECOVERED fallback
    rows older than 30 days. One runner at a time (advisory lock); a busy partition is left for the
    next run. `conn` must not be inside a transaction: every batch commits on its own. A run that
    removed anything appends one audit row (`actor`) listing what."""
    settings = settings or RetentionSettings()
    if conn.is_in_transaction():
        raise RuntimeError("run_retention commits batch by batch; call it outside a transaction")
    report = RetentionReport()
    if not await conn.fetchval(query("retention_try_lock")):
        log.info("retention_skipped", reason="another runner holds the retention lock")
        report.ran = False
        return report
    try:
        report.partitions_created = await ensure_partitions(conn)
        names = [r["name"] for r in await conn.fetch(query("retention_partitions"))]
        for_trim: list[str] = []
        for partition in retention_candidates(names):
            outcome = await conn.fetchval(query("retention_drop_partition"), partition)
            if outcome == "dropped":
                report.dropped.append(partition)
                continue
            if outcome == "busy":
                report.busy.append(partition)
                continue
            if outcome == "protected":
                # The database's clock says this month is still open (the caller's clock is ahead).
                continue
            if outcome == "unfrozen_rows":
                # Left whole: dropped once frozen, instead of deleting its other rows one by one now.
                report.unfrozen.append(partition)
                continue
            for_trim.append(partition)
            report.kept.append(partition)
        if DEFAULT_PARTITION in names:
            for_trim.append(DEFAULT_PARTITION)
        for partition in for_trim:
            deleted, bounded, busy = await _trim(conn, partition, settings)
            if deleted:
                report.trimmed[partition] = deleted
            if busy:
                report.busy.append(partition)
            report.more_pending |= bounded
        report.fallback_purged, bounded = await _purge_fallback(conn, settings)
        report.more_pending |= bounded
        if report.removed_anything:
            await conn.execute(query("insert_audit"), AUDIT_ACTION, actor, None, None, None, report.as_dict())
    finally:
        await conn.fetchval(query("retention_unlock"))
    if report.unfrozen:
        log.warning(
            "retention_kept_unfrozen_rows",
            partitions=report.unfrozen,
            hint="a closed month has billable rows in no invoice snapshot: freeze it (revkernel freeze)",
        )
    log.info("RETENTION_COMPLETE", **report.as_dict())
    return report
