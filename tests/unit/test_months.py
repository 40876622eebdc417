from datetime import UTC, datetime

import pytest

from shared.months import (
    add_months,
    is_year_month,
    months_between,
    parse_year_month,
    seconds_until_next_month,
    year_month_of,
)


def test_year_month_validation() -> None:
    assert is_year_month("2026-01")
    for bad in ("2026-13", "2026-00", "26-01", "2026-1", "2026-01-01", "", None, 202601):
        assert not is_year_month(bad)


@pytest.mark.parametrize(
    "bad", ["2026-08\n", "\u0662\u0660\u0662\u0666-08", "2026-\uff10\uff18", "0000-05", " 2026-08"]
)
def test_year_month_refuses_what_postgres_refuses(bad: str) -> None:
    """Postgres's year_month check is ASCII `^[0-9]{4}-[0-9]{2}$`: a trailing newline or another
    script's digits must be a 400 at the door, not a check violation after the work started."""
    assert not is_year_month(bad)
    with pytest.raises(ValueError):
        parse_year_month(bad)


def test_month_arithmetic_stops_at_the_calendar_ends() -> None:
    assert months_between("9999-11", "9999-12") == ["9999-11", "9999-12"]
    assert months_between("9999-12", "9999-12") == ["9999-12"]
    for month, delta in (("9999-12", 1), ("0001-01", -1)):
        with pytest.raises(ValueError):
            add_months(month, delta)


def test_add_months_crosses_years() -> None:
    assert add_months("2026-12", 1) == "2027-01"
    assert add_months("2026-01", -1) == "2025-12"
    assert months_between("2026-11", "2027-02") == ["2026-11", "2026-12", "2027-01", "2027-02"]
    assert months_between("2026-03", "2026-02") == []


def test_year_month_is_utc() -> None:
    from zoneinfo import ZoneInfo

    local = datetime(2026, 3, 1, 1, 30, tzinfo=ZoneInfo("Europe/Istanbul"))  # 2026-02-28 22:30 UTC
    assert year_month_of(local) == "2026-02"


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC), 1),
        (datetime(2026, 11, 30, 23, 59, 59, 500000, tzinfo=UTC), 1),
        (datetime(2026, 12, 31, 0, 0, 0, tzinfo=UTC), 86400),
    ],
)
def test_seconds_until_next_month_rounds_up(now: datetime, expected: int) -> None:
    assert seconds_until_next_month(now) == expected
