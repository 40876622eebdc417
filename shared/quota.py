"""Quota decisions (SPEC §5): the k-th billable event of the UTC month, as pure functions."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from shared.months import add_months, month_start
from shared.sites import Plan

# Event classes that are stored and published but never billed: (ec, ea or None for any) → reason.
NON_BILLABLE_CLASSES: tuple[tuple[str, str | None, str], ...] = (
    ("system", None, "system"),
    ("interaction", "scroll_depth", "scroll_depth"),
)
USAGE_KEY_GRACE = timedelta(days=35)


class Decision(enum.Enum):
    ACCEPTED = "accepted"
    OVERAGE = "overage"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class QuotaOutcome:
    decision: Decision
    k: int  # the event's rank among the month's billable events (the k it would have had if rejected)
    remaining: int  # x-opsmantik-quota-remaining = max(0, N - k)


def non_billable_reason(event: dict[str, Any]) -> str | None:
    """The `billing_reason` of a non-billable event class, or None for a billable event."""
    ec, ea = event.get("ec"), event.get("ea")
    for cls_ec, cls_ea, reason in NON_BILLABLE_CLASSES:
        if ec == cls_ec and (cls_ea is None or ea == cls_ea):
            return reason
    return None


def acceptance_cap(plan: Plan) -> int:
    """How many billable events the month may hold: N, or H with soft limits on."""
    return max(plan.hard_cap, plan.monthly_limit) if plan.soft_limit_enabled else plan.monthly_limit


def events_to_take(used_before: int, count: int, plan: Plan) -> int:
    """How many of `count` new events fit (the reservation size; mirrored by reserve_quota.lua)."""
    return max(0, min(count, acceptance_cap(plan) - used_before))


def passes_monthly_limit(used_before: int, count: int, plan: Plan) -> bool:
    """Whether some of `count` new events would be the (N+1)-th or later: taken as OVERAGE or refused.

    Only there does a counter that runs ahead of Postgres (a reservation a killed process never gave
    back) change an answer, so that is where the gate checks the counter against Postgres first.
    """
    return used_before + count > plan.monthly_limit


def decide_group(used_before: int, count: int, plan: Plan) -> list[QuotaOutcome]:
    """Decisions for `count` billable events of one (site, month), in arrival order."""
    take = events_to_take(used_before, count, plan)
    outcomes: list[QuotaOutcome] = []
    for index in range(count):
        if index < take:
            k = used_before + index + 1
            decision = Decision.ACCEPTED if k <= plan.monthly_limit else Decision.OVERAGE
        else:
            k = used_before + take + 1
            decision = Decision.REJECTED
        outcomes.append(QuotaOutcome(decision, k, max(0, plan.monthly_limit - k)))
    return outcomes


def usage_key(site_id: UUID, year_month: str) -> str:
    """Redis reservation counter of a (site, month)."""
    return f"usage:{site_id}:{year_month}"


def usage_key_ttl_seconds(year_month: str, now: datetime | None = None) -> int:
    """Keep a month's counter until well after the month ends (reconciliation still reads it)."""
    now = now or datetime.now(UTC)
    until = month_start(add_months(year_month, 1)) + USAGE_KEY_GRACE
    return max(60, int((until - now).total_seconds()))
