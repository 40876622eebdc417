"""Pure rules of reconciliation, recovery, commands and the watchtower (no servers)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from services.reconciler.recovery import idempotency_row, outgoing_message
from shared.commands import (
    CommandRejected,
    MalformedCommand,
    decode_command,
    encode_command,
    reply_http_status,
)
from shared.reconciliation import (
    BackfillInvalid,
    JobSettings,
    drift_pct,
    drift_threshold,
    needs_correction,
    open_months,
    parse_backfill_request,
    retry_delay_s,
    usage_key,
)
from shared.watchtower import overall_status, watchtower_checks


@pytest.mark.parametrize(
    ("pg", "observed", "corrected"),
    [
        (0, 10, False),  # threshold floor is 10
        (0, 11, True),
        (500, 510, False),
        (500, 511, True),
        (500, 489, True),
        (5000, 5050, False),  # 1 % of 5000 = 50
        (5000, 5051, True),
        (5000, 4949, True),
    ],
)
def test_correction_threshold(pg: int, observed: int, corrected: bool) -> None:
    assert needs_correction(observed, pg) is corrected


def test_drift_pct_and_threshold() -> None:
    assert drift_threshold(0) == 10 and drift_threshold(2000) == 20
    assert drift_pct(100, 200) == 0.5
    assert drift_pct(7, 0) == 0.0


def test_usage_key_matches_the_gateway_format() -> None:
    site = uuid.UUID("6EB17A2D-B953-43A7-AA5A-4E3EE2CD1B27")
    assert usage_key(site, "2026-11") == "usage:6eb17a2d-b953-43a7-aa5a-4e3ee2cd1b27:2026-11"


def test_open_months_and_backoff() -> None:
    assert open_months(datetime(2026, 1, 3, tzinfo=UTC)) == ("2026-01", "2025-12")
    settings = JobSettings(retry_base_s=30, retry_max_s=100)
    assert [retry_delay_s(n, settings) for n in (1, 2, 3, 4)] == [30, 60, 100, 100]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (None, "invalid_json"),
        ([], "invalid_json"),
        ({"from": "2024-00", "to": "2024-01"}, "invalid_month"),
        ({"from": "2024-1", "to": "2024-01"}, "invalid_month"),
        ({"from": "2024-06\n", "to": "2024-08"}, "invalid_month"),
        ({"from": "2024-01"}, "invalid_month"),
        ({"from": "2024-03", "to": "2024-02"}, "invalid_range"),
        ({"from": "2024-01", "to": "2025-01"}, "range_too_large"),
        ({"from": "2024-01", "to": "2024-01", "site_id": "x"}, "invalid_site_id"),
        ({"from": "2024-01", "to": "2024-01", "site_id": ["a"]}, "invalid_site_id"),
    ],
)
def test_backfill_rejections(body: object, code: str) -> None:
    with pytest.raises(BackfillInvalid) as info:
        parse_backfill_request(body)
    assert info.value.code == code and info.value.reason


def test_backfill_of_the_last_calendar_month() -> None:
    """months_between must not step past 9999-12 (it once compared "10000-01" < "9999-12" and crashed)."""
    assert parse_backfill_request({"from": "9999-12", "to": "9999-12"}).months == ("9999-12",)


def test_backfill_accepts_twelve_months_across_a_year() -> None:
    site = uuid.uuid4()
    request = parse_backfill_request({"from": "2024-02", "to": "2025-01", "site_id": str(site)})
    assert len(request.months) == 12 and request.months[0] == "2024-02" and request.months[-1] == "2025-01"
    assert request.site_id == site


def test_command_codec_and_statuses() -> None:
    request = decode_command(encode_command("run", {"limit": 3}, "rid"))
    assert (request.name, dict(request.args), request.request_id) == ("run", {"limit": 3}, "rid")
    for bad in (b"nope", b"[]", b'{"args": {}}', b'{"name": "x", "args": 3}'):
        with pytest.raises(MalformedCommand):
            decode_command(bad)
    assert decode_command(b'{"name": "x"}').request_id  # a missing request id is generated
    assert reply_http_status({"ok": True}) == 200
    assert reply_http_status(CommandRejected("bad").reply()) == 400
    assert reply_http_status({"ok": False}) == 500
    assert reply_http_status({"ok": False, "status": 200}) == 500


def test_recovery_message_is_the_stored_payload() -> None:
    site = uuid.uuid4()
    bucket = datetime(2026, 11, 1, tzinfo=UTC)
    single = {"s": "p", "ingest_id": "ing-1", "idempotency_key": "k1", "url": "u"}
    row = {
        "id": uuid.uuid4(),
        "site_id": site,
        "idempotency_key": "k1",
        "bucket_at": bucket,
        "payload": single,
        "routing_key": "event.p",
    }
    message = outgoing_message(row)
    assert orjson.loads(message.body) == single and message.message_id == "ing-1"
    assert message.routing_key == "event.p" and message.headers == {}
    assert idempotency_row(row) == (site, "k1", bucket)

    # A client's own `events` field is data of the one event the row holds, not a batch envelope.
    nested = {**single, "events": [{"idempotency_key": "forged", "site_id": str(uuid.uuid4())}]}
    row = {**row, "payload": nested}
    message = outgoing_message(row)
    assert orjson.loads(message.body) == nested and message.headers == {}
    assert message.message_id == "ing-1"
    assert idempotency_row(row) == (site, "k1", bucket)


def test_watchtower_statuses() -> None:
    quiet = {
        "fallback_pending": 3,
        "fallback_failed": 0,
        "oldest_pending_age_s": 4.2,
        "jobs_failed": 0,
        "default_partition_rows": 0,
    }
    checks = watchtower_checks(quiet, 0)
    assert overall_status(checks) == "ok"
    assert checks["fallbackBacklog"] == {
        "status": "ok",
        "pending": 3,
        "failed": 0,
        "oldest_pending_age_s": 4.2,
    }
    stale = watchtower_checks({**quiet, "oldest_pending_age_s": 301.0}, 0)
    assert stale["fallbackBacklog"]["status"] == "degraded" and overall_status(stale) == "degraded"
    for change, name in (
        ({"fallback_failed": 1}, "fallbackBacklog"),
        ({"jobs_failed": 2}, "reconciliationJobsFailed"),
        ({"default_partition_rows": 1}, "defaultPartitionRows"),
    ):
        assert watchtower_checks({**quiet, **change}, 0)[name]["status"] == "degraded"
    assert watchtower_checks(quiet, 1)["billingReconciliationDriftLast1h"] == {
        "status": "degraded",
        "count": 1,
    }
