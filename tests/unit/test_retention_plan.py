from datetime import UTC, datetime

from shared.retention import RetentionReport, partition_month, retention_candidates


def test_partition_month_parses_only_month_partition_names() -> None:
    assert partition_month("ingest_idempotency_p2026_01") == "2026-01"
    assert partition_month("ingest_idempotency_p2026_12") == "2026-12"
    for name in (
        "ingest_idempotency_default",
        "ingest_idempotency_p2026_13",
        "ingest_idempotency_p2026_1",
        "sites",
        "ingest_idempotency_p2026_01_old",
    ):
        assert partition_month(name) is None, name


def test_candidates_are_older_than_the_previous_month_oldest_first() -> None:
    now = datetime(2026, 3, 1, 0, 0, 1, tzinfo=UTC)  # current 2026-03, previous 2026-02
    names = [
        "ingest_idempotency_p2026_03",
        "ingest_idempotency_p2026_02",
        "ingest_idempotency_p2026_01",
        "ingest_idempotency_p2025_11",
        "ingest_idempotency_p2026_04",
        "ingest_idempotency_default",
    ]
    assert retention_candidates(names, now) == ["ingest_idempotency_p2025_11", "ingest_idempotency_p2026_01"]


def test_candidates_across_a_year_edge() -> None:
    now = datetime(2027, 1, 31, 23, 59, 59, tzinfo=UTC)  # previous month 2026-12
    names = ["ingest_idempotency_p2026_12", "ingest_idempotency_p2026_11", "ingest_idempotency_p2027_01"]
    assert retention_candidates(names, now) == ["ingest_idempotency_p2026_11"]


def test_report_as_dict_totals_trimmed_rows() -> None:
    report = RetentionReport(dropped=["ingest_idempotency_p2026_01"], trimmed={"a": 3, "b": 4})
    out = report.as_dict()
    assert out["dropped_partitions"] == ["ingest_idempotency_p2026_01"]
    assert out["trimmed_total"] == 7 and out["ran"] is True
