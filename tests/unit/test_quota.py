from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.quota import Decision, decide_group, events_to_take, non_billable_reason, passes_monthly_limit
from shared.sites import MAX_HARD_CAP, Plan


def decisions(used: int, n: int, plan: Plan) -> list[str]:
    return [o.decision.value[0].upper() for o in decide_group(used, n, plan)]


def test_hard_limit_accepts_exactly_n() -> None:
    plan = Plan(monthly_limit=5)
    assert decisions(0, 7, plan) == ["A"] * 5 + ["R"] * 2
    assert [o.remaining for o in decide_group(0, 5, plan)] == [4, 3, 2, 1, 0]


def test_soft_limit_accepts_n_then_overage_up_to_hard_cap() -> None:
    plan = Plan(monthly_limit=5, soft_limit_enabled=True, hard_cap_multiplier=Decimal(2))
    assert decisions(0, 12, plan) == ["A"] * 5 + ["O"] * 5 + ["R"] * 2
    assert decisions(7, 4, plan) == ["O", "O", "O", "R"]


def test_hard_cap_is_floored() -> None:
    plan = Plan(monthly_limit=3, soft_limit_enabled=True, hard_cap_multiplier=Decimal("1.5"))
    assert plan.hard_cap == 4
    assert decisions(0, 6, plan) == ["A", "A", "A", "O", "R", "R"]


def test_usage_already_over_a_lowered_plan_rejects() -> None:
    assert decisions(10, 2, Plan(monthly_limit=5)) == ["R", "R"]


@given(
    used=st.integers(0, 200),
    n=st.integers(0, 200),
    limit=st.integers(0, 100),
    soft=st.booleans(),
    mult=st.sampled_from([Decimal(1), Decimal("1.5"), Decimal(2), Decimal(3)]),
)
def test_kth_event_rule_matches_the_spec(used: int, n: int, limit: int, soft: bool, mult: Decimal) -> None:
    plan = Plan(monthly_limit=limit, soft_limit_enabled=soft, hard_cap_multiplier=mult)
    outcomes = decide_group(used, n, plan)
    k = used
    for outcome in outcomes:
        candidate = k + 1
        if candidate <= limit:
            expected = Decision.ACCEPTED
        elif soft and candidate <= plan.hard_cap:
            expected = Decision.OVERAGE
        else:
            expected = Decision.REJECTED
        assert outcome.decision is expected
        if expected is not Decision.REJECTED:
            k = candidate
            assert outcome.remaining == max(0, limit - k)
    assert events_to_take(used, n, plan) == k - used


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"ec": "system"}, "system"),
        ({"ec": "system", "ea": "anything"}, "system"),
        ({"ec": "interaction", "ea": "scroll_depth"}, "scroll_depth"),
        ({"ec": "interaction", "ea": "click"}, None),
        ({"ec": "page"}, None),
        ({}, None),
    ],
)
def test_non_billable_classes(event: dict[str, str], reason: str | None) -> None:
    assert non_billable_reason(event) == reason


def test_passes_monthly_limit_exactly_when_a_decision_is_not_plain_acceptance() -> None:
    for plan in (Plan(monthly_limit=5), Plan(monthly_limit=5, soft_limit_enabled=True)):
        for used in range(8):
            for count in range(1, 4):
                plain = set(decisions(used, count, plan)) == {"A"}
                assert passes_monthly_limit(used, count, plan) is not plain


def test_hard_cap_is_the_exact_floor_and_bounded() -> None:
    # A 28-digit Decimal product rounded this up to 6 (one overage event too many).
    plan = Plan(3, soft_limit_enabled=True, hard_cap_multiplier=Decimal("1.99999999999999999999999999999"))
    assert plan.hard_cap == 5
    assert Plan(7, hard_cap_multiplier=Decimal("1.5")).hard_cap == 10
    # A multiplier set in SQL beyond reason: a cap the gate can still send to Redis.
    huge = Plan(1000, soft_limit_enabled=True, hard_cap_multiplier=Decimal("1E+5000"))
    assert huge.hard_cap == MAX_HARD_CAP and events_to_take(0, 3, huge) == 3
    # Postgres numeric takes 'Infinity' and 'NaN', and both pass CHECK (>= 1); both raised here.
    assert Plan(10, soft_limit_enabled=True, hard_cap_multiplier=Decimal("Infinity")).hard_cap == MAX_HARD_CAP
    assert Plan(10, soft_limit_enabled=True, hard_cap_multiplier=Decimal("NaN")).hard_cap == 10
