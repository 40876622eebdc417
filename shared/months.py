"""UTC month arithmetic on `YYYY-MM` strings (pure)."""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime

# ASCII digits only, and `fullmatch`: `$` would also accept a trailing newline and `\d` any Unicode
# digit ("٢٠٢٦-08"), which Postgres's `year_month_text` check then refuses. Year 0000 is refused too:
# it has no `datetime`.
_YEAR_MONTH = re.compile(r"(?!0000)([0-9]{4})-(0[1-9]|1[0-2])")
FIRST_YEAR_MONTH = "0001-01"
LAST_YEAR_MONTH = "9999-12"


def is_year_month(value: object) -> bool:
    """True for a well-formed `YYYY-MM` string (month 01-12)."""
    return isinstance(value, str) and _YEAR_MONTH.fullmatch(value) is not None


def parse_year_month(value: str) -> tuple[int, int]:
    """`YYYY-MM` → (year, month); ValueError for anything else."""
    match = _YEAR_MONTH.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"not a YYYY-MM month: {value!r}")
    return int(match.group(1)), int(match.group(2))


def format_year_month(year: int, month: int) -> str:
    return f"{year:04d}-{month:02d}"


def year_month_of(instant: datetime) -> str:
    """The UTC month of an aware instant."""
    utc = instant.astimezone(UTC)
    return format_year_month(utc.year, utc.month)


def current_year_month(now: datetime | None = None) -> str:
    return year_month_of(now or datetime.now(UTC))


def add_months(year_month: str, months: int) -> str:
    """The month `months` later (or earlier); ValueError outside 0001-01..9999-12."""
    year, month = parse_year_month(year_month)
    index = year * 12 + (month - 1) + months
    if not 12 <= index < 10_000 * 12:
        raise ValueError(f"{year_month} + {months} months is outside {FIRST_YEAR_MONTH}..{LAST_YEAR_MONTH}")
    return format_year_month(index // 12, index % 12 + 1)


def month_start(year_month: str) -> datetime:
    """00:00 UTC of the month's first day."""
    year, month = parse_year_month(year_month)
    return datetime(year, month, 1, tzinfo=UTC)


def month_first_day(year_month: str) -> date:
    return month_start(year_month).date()


def months_between(first: str, last: str) -> list[str]:
    """Inclusive list of months from `first` to `last` (empty when first > last)."""
    out: list[str] = []
    cursor = first
    while cursor <= last:
        out.append(cursor)
        if cursor == LAST_YEAR_MONTH:
            break
        cursor = add_months(cursor, 1)
    return out


def seconds_until_next_month(now: datetime | None = None) -> int:
    """Whole seconds, rounded up, until 00:00 UTC of the next month (quota Retry-After)."""
    now = now or datetime.now(UTC)
    nxt = month_start(add_months(year_month_of(now), 1))
    return max(1, math.ceil((nxt - now.astimezone(UTC)).total_seconds()))
