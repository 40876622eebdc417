import hashlib
import uuid
from datetime import UTC, datetime

import pytest

from shared.freeze import (
    FreezeRefused,
    FreezeResult,
    default_freeze_month,
    freezable_month,
    scheduled_freeze_month,
    snapshot_hash,
)

SITE = uuid.UUID("0b7c4f52-9a51-4d0e-8f3e-2f1c5d6e7a80")


def test_snapshot_hash_is_sha256_of_the_colon_separated_material() -> None:
    material = "0b7c4f52-9a51-4d0e-8f3e-2f1c5d6e7a80:2026-10:1500:250:abc123"
    assert (
        snapshot_hash(SITE, "2026-10", 1500, 250, "abc123") == hashlib.sha256(material.encode()).hexdigest()
    )
    # Every component changes it, the commit included.
    base = snapshot_hash(SITE, "2026-10", 1500, 250, "abc123")
    assert (
        len(
            {
                base,
                snapshot_hash(SITE, "2026-10", 1500, 250, "abc124"),
                snapshot_hash(SITE, "2026-10", 1501, 250, "abc123"),
                snapshot_hash(SITE, "2026-10", 1500, 251, "abc123"),
                snapshot_hash(SITE, "2026-09", 1500, 250, "abc123"),
            }
        )
        == 5
    )


NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_default_is_the_previous_utc_month() -> None:
    assert default_freeze_month(NOW) == "2026-10"
    assert default_freeze_month(datetime(2027, 1, 1, 0, 0, tzinfo=UTC)) == "2026-12"
    assert freezable_month(None, NOW) == "2026-10"


def test_past_months_are_freezable() -> None:
    assert freezable_month("2026-10", NOW) == "2026-10"
    assert freezable_month("2019-01", NOW) == "2019-01"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("2026-11", "month_not_closed"),
        ("2026-12", "month_not_closed"),
        ("2031-01", "month_not_closed"),
        ("2026-13", "invalid_year_month"),
        ("2026-1", "invalid_year_month"),
        ("", "invalid_year_month"),
        (202610, "invalid_year_month"),
        (["2026-10"], "invalid_year_month"),
    ],
)
def test_current_future_and_malformed_months_are_refused(value: object, code: str) -> None:
    with pytest.raises(FreezeRefused) as info:
        freezable_month(value, NOW)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("now", "month"),
    [
        (datetime(2026, 12, 1, 0, 0, tzinfo=UTC), "2026-10"),
        (datetime(2026, 12, 1, 0, 9, 59, tzinfo=UTC), "2026-10"),
        (datetime(2026, 12, 1, 0, 10, tzinfo=UTC), "2026-11"),
        (datetime(2026, 12, 15, tzinfo=UTC), "2026-11"),
        (datetime(2027, 1, 1, 0, 10, 1, tzinfo=UTC), "2026-12"),
    ],
)
def test_schedule_closes_the_previous_month_from_00_10_on_the_first(now: datetime, month: str) -> None:
    assert scheduled_freeze_month(now) == month


def test_reply_is_the_spec_body() -> None:
    result = FreezeResult(
        "2026-10", inserted=2, skipped=1, total_sites=3, commit_sha="c", generated_by="g", duration_ms=1.0
    )
    assert result.reply() == {
        "ok": True,
        "year_month": "2026-10",
        "inserted": 2,
        "skipped": 1,
        "total_sites": 3,
    }
