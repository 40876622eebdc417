import csv
import io
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.dispute_export import (
    CSV_HEADER,
    ExportAccess,
    csv_field,
    decide_export_access,
    export_filename,
    format_created_at,
    format_row,
    format_rows,
)


def test_created_at_is_utc_with_microseconds_and_z() -> None:
    assert (
        format_created_at(datetime(2026, 11, 5, 10, 0, 0, 123456, tzinfo=UTC))
        == "2026-11-05T10:00:00.123456Z"
    )
    # Zero microseconds are still written (isoformat would drop them by default).
    assert format_created_at(datetime(2026, 11, 5, 10, 0, tzinfo=UTC)) == "2026-11-05T10:00:00.000000Z"
    assert format_created_at(datetime(2026, 1, 1, 0, 0, 0, 7, tzinfo=UTC)) == "2026-01-01T00:00:00.000007Z"


def test_created_at_in_another_zone_is_converted_to_utc() -> None:
    istanbul = timezone(timedelta(hours=3))
    assert format_created_at(datetime(2026, 3, 1, 1, 30, tzinfo=istanbul)) == "2026-02-28T22:30:00.000000Z"


def test_naive_created_at_is_refused() -> None:
    with pytest.raises(ValueError):
        format_created_at(datetime(2026, 3, 1))


def test_row_format() -> None:
    at = datetime(2026, 11, 5, 10, 0, 0, 123456, tzinfo=UTC)
    assert (
        format_row(at, "ab" * 32, 1, "ACCEPTED", True)
        == f"2026-11-05T10:00:00.123456Z,{'ab' * 32},1,ACCEPTED,true\n"
    )
    assert (
        format_row(at, "v2:ff", 2, "OVERAGE", False) == "2026-11-05T10:00:00.123456Z,v2:ff,2,OVERAGE,false\n"
    )


def test_fields_are_quoted_only_when_needed() -> None:
    assert csv_field("v2:abc") == "v2:abc"
    assert csv_field('a,"b"') == '"a,""b"""'
    assert csv_field("line\nbreak") == '"line\nbreak"'


def test_rows_parse_back_with_a_standard_csv_reader() -> None:
    at = datetime(2026, 11, 5, 10, 0, tzinfo=UTC)
    keys = ["plain", 'comma,and "quote"', "new\nline"]
    body = CSV_HEADER + format_rows([(at, key, 1, "ACCEPTED", i % 2 == 0) for i, key in enumerate(keys)])
    parsed = list(csv.reader(io.StringIO(body.decode(), newline="")))
    assert parsed[0] == ["created_at", "idempotency_key", "idempotency_version", "billing_state", "billable"]
    assert [row[1] for row in parsed[1:]] == keys
    assert [row[4] for row in parsed[1:]] == ["true", "false", "true"]
    assert body.count(b"\r") == 0


def test_header_and_filename() -> None:
    assert CSV_HEADER == b"created_at,idempotency_key,idempotency_version,billing_state,billable\n"

    site = uuid.UUID("6f1c1d4e-0000-4000-8000-000000000001")
    assert export_filename(site, "2026-10") == "dispute-6f1c1d4e-0000-4000-8000-000000000001-2026-10.csv"


@pytest.mark.parametrize(
    ("admin", "role", "exists", "expected"),
    [
        (False, "owner", True, ExportAccess.ALLOWED),
        (False, "admin", True, ExportAccess.ALLOWED),
        (False, "billing", True, ExportAccess.ALLOWED),
        (False, "viewer", True, ExportAccess.FORBIDDEN),
        (False, None, True, ExportAccess.FORBIDDEN),
        (False, None, False, ExportAccess.FORBIDDEN),
        (True, None, True, ExportAccess.ALLOWED),
        (True, "viewer", True, ExportAccess.ALLOWED),
        (True, None, False, ExportAccess.SITE_NOT_FOUND),
    ],
)
def test_access_decision(admin: bool, role: str | None, exists: bool, expected: ExportAccess) -> None:
    assert decide_export_access(is_platform_admin=admin, member_role=role, site_exists=exists) is expected


@given(
    st.lists(
        st.tuples(
            st.datetimes(
                min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 30), timezones=st.timezones()
            ),
            st.text(min_size=1, max_size=128),
            st.sampled_from([1, 2]),
            st.sampled_from(["ACCEPTED", "OVERAGE", "DEGRADED_CAPTURE", "RECOVERED"]),
            st.booleans(),
        ),
        max_size=20,
    )
)
def test_batch_formatting_equals_row_formatting(rows: list[tuple[datetime, str, int, str, bool]]) -> None:
    """The inlined hot loop and the one-row function never disagree, and every line parses back."""
    body = format_rows(rows)
    assert body == "".join(format_row(*row) for row in rows).encode()
    parsed = list(csv.reader(io.StringIO(body.decode(), newline="")))
    assert [p[1] for p in parsed] == [row[1] for row in rows]
    assert [p[0] for p in parsed] == [format_created_at(row[0]) for row in rows]
    assert all(p[0].endswith("Z") and len(p[0]) == 27 for p in parsed)
