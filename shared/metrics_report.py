"""The SPEC §11 billing metrics object: `/api/metrics` answers it and the watchtower embeds it as
`billing_metrics`. One builder, so both always carry the same fields."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg

from shared.billing_counters import BillingCounters
from shared.queries import query

DRIFT_SITES_KEY = "billing_reconciliation_drift_sites_last1h"
DB_TIMEOUT_S = 3.0


def rfc3339_utc(moment: datetime) -> str:
    """`2026-11-25T00:10:00.123456Z`."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


async def drift_sites_last1h(pool: asyncpg.Pool, timeout_s: float = DB_TIMEOUT_S) -> int:
    """Distinct sites with a COMPLETED job whose last_drift_pct > 0.01, updated in the last hour.
    Raises (asyncpg/OS errors, TimeoutError) when Postgres does not answer."""
    value = await asyncio.wait_for(pool.fetchval(query("metrics_drift_sites_last1h")), timeout=timeout_s)
    return int(value or 0)


async def build_billing_metrics(
    counters: BillingCounters, pool: asyncpg.Pool, *, now: datetime | None = None
) -> dict[str, int | str]:
    """Every fleet counter → int, the drift gauge, and `generated_at` (RFC 3339 UTC).

    Counter totals come from Redis (plus this process's unflushed share when Redis is down); the drift
    gauge from Postgres, so this raises when Postgres is unreachable."""
    totals, drift = await asyncio.gather(counters.totals(), drift_sites_last1h(pool))
    report: dict[str, int | str] = dict(totals)
    report[DRIFT_SITES_KEY] = drift
    report["generated_at"] = rfc3339_utc(now or datetime.now(UTC))
    return report
