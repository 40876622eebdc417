"""The watchtower report (SPEC §11): a few Postgres checks, each `ok` or `degraded`, plus the billing
metrics object. Reads only; the decision of each check is a pure function of the numbers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import asyncpg

from shared.billing_counters import BillingCounters
from shared.metrics_report import DRIFT_SITES_KEY, build_billing_metrics
from shared.queries import query

# A PENDING row older than this means recovery is not keeping up (it runs every few seconds).
FALLBACK_MAX_PENDING_AGE_S = 300.0
DB_TIMEOUT_S = 3.0


def _status(degraded: bool) -> str:
    return "degraded" if degraded else "ok"


def watchtower_checks(row: Mapping[str, Any], drift_sites: int) -> dict[str, dict[str, Any]]:
    """The checks object from the raw numbers (pure)."""
    oldest = row["oldest_pending_age_s"]
    oldest_s = None if oldest is None else round(float(oldest), 3)
    pending, failed = int(row["fallback_pending"]), int(row["fallback_failed"])
    jobs_failed, default_rows = int(row["jobs_failed"]), int(row["default_partition_rows"])
    return {
        "billingReconciliationDriftLast1h": {"status": _status(drift_sites > 0), "count": drift_sites},
        "fallbackBacklog": {
            "status": _status(failed > 0 or (oldest_s is not None and oldest_s > FALLBACK_MAX_PENDING_AGE_S)),
            "pending": pending,
            "failed": failed,
            "oldest_pending_age_s": oldest_s,
        },
        "reconciliationJobsFailed": {"status": _status(jobs_failed > 0), "count": jobs_failed},
        "defaultPartitionRows": {"status": _status(default_rows > 0), "count": default_rows},
    }


def overall_status(checks: Mapping[str, Mapping[str, Any]]) -> str:
    return _status(any(c["status"] == "degraded" for c in checks.values()))


async def build_watchtower(pool: asyncpg.Pool, counters: BillingCounters) -> dict[str, Any]:
    """`{ok, status, checks, billing_metrics}`; raises when Postgres does not answer."""
    row, metrics = await asyncio.gather(
        asyncio.wait_for(pool.fetchrow(query("watchtower_checks")), timeout=DB_TIMEOUT_S),
        build_billing_metrics(counters, pool),
    )
    assert row is not None
    drift = metrics[DRIFT_SITES_KEY]
    checks = watchtower_checks(row, int(drift))
    return {"ok": True, "status": overall_status(checks), "checks": checks, "billing_metrics": metrics}
