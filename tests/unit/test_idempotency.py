"""SPEC §4 key vectors, computed independently of shared.idempotency (plain hashlib here)."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.idempotency import compute_key

SITE = uuid.UUID("3F2504E0-4F89-11D3-9A0C-0305E82C3301")
SERVER_MS = 1_764_000_123_456  # 2025-11-24T16:02:03.456Z


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_v1_vector() -> None:
    event = {"s": "p", "url": "  https://example.com/a  ", "ec": "c", "ea": "e", "el": "l", "sid": "S"}
    expected = sha("3f2504e0-4f89-11d3-9a0c-0305e82c3301:c|e|l:https://example.com/a:S:1764000120000")
    key = compute_key(SITE, event, SERVER_MS, 1)
    assert key.key == expected
    assert key.version == 1 and key.t_ms == 1_764_000_120_000


def test_v1_missing_fields_are_empty_and_legacy_u_and_meta_fp() -> None:
    event = {"s": "p", "u": "https://example.com/b", "meta": {"fp": "FP"}, "sid": "ignored"}
    expected = sha("3f2504e0-4f89-11d3-9a0c-0305e82c3301:||:https://example.com/b:FP:1764000120000")
    assert compute_key(SITE, event, SERVER_MS, 1).key == expected


def test_v1_same_bucket_same_key_next_bucket_differs() -> None:
    event = {"s": "p", "url": "https://x"}
    assert compute_key(SITE, event, 1_764_000_120_000, 1) == compute_key(SITE, event, 1_764_000_124_999, 1)
    assert (
        compute_key(SITE, event, 1_764_000_125_000, 1).key
        != compute_key(SITE, event, 1_764_000_124_999, 1).key
    )


def test_v2_heartbeat_uses_10s_bucket_and_client_clock_within_5_minutes() -> None:
    client_ts_s = (SERVER_MS - 60_000) / 1000  # one minute behind, in seconds
    event = {"s": "p", "url": "https://x", "ea": "heartbeat", "ts": client_ts_s}
    t = (SERVER_MS - 60_000) // 10_000 * 10_000
    expected = "v2:" + sha(f"3f2504e0-4f89-11d3-9a0c-0305e82c3301:|heartbeat|:https://x::{t}")
    key = compute_key(SITE, event, SERVER_MS, 2)
    assert key.key == expected and key.version == 2


def test_v2_client_clock_outside_window_falls_back_to_server_time() -> None:
    event = {"s": "p", "url": "https://x", "ea": "page_view", "ts": SERVER_MS - 6 * 60_000}
    t = SERVER_MS // 2000 * 2000
    assert compute_key(SITE, event, SERVER_MS, 2).t_ms == t


@given(ts=st.floats(allow_nan=True, allow_infinity=True) | st.integers())
def test_v2_any_numeric_ts_gives_a_key(ts: float) -> None:
    """A `ts` the clock rules cannot use falls back to server time; none raises (-1e306 seconds
    overflowed to -inf ms and answered 500, failing its whole batch)."""
    for ea in ("heartbeat", "page_view"):
        event = {"s": "p", "url": "https://x", "ea": ea, "ts": ts}
        assert compute_key(SITE, event, SERVER_MS, 2).t_ms > 0
    for far_ts in (-1.5e306, 10**400, -(10**400)):
        far = {"s": "p", "url": "https://x", "ea": "heartbeat", "ts": far_ts}
        assert compute_key(SITE, far, SERVER_MS, 2).t_ms == SERVER_MS // 10_000 * 10_000


@pytest.mark.parametrize("kind", [{"ec": "page"}, {"ea": "page_view"}, {"ec": "page", "ea": "page_view"}])
def test_v2_page_view_uses_client_ms_and_2s_bucket(kind: dict[str, str]) -> None:
    event = {"s": "p", "url": "https://x", **kind, "ts": SERVER_MS - 3_001}
    assert compute_key(SITE, event, SERVER_MS, 2).t_ms == (SERVER_MS - 3_001) // 2000 * 2000
    in_seconds = {**event, "ts": (SERVER_MS - 3_001) / 1000}  # below 10^12: seconds
    assert compute_key(SITE, in_seconds, SERVER_MS, 2).t_ms == (SERVER_MS - 3_001) // 2000 * 2000
    at_the_edge = {**event, "ts": SERVER_MS - 300_000}  # within ±5 minutes, inclusive
    assert compute_key(SITE, at_the_edge, SERVER_MS, 2).t_ms == (SERVER_MS - 300_000) // 2000 * 2000
    too_far = {**event, "ts": SERVER_MS + 300_001}  # beyond: server time
    assert compute_key(SITE, too_far, SERVER_MS, 2).t_ms == SERVER_MS // 2000 * 2000


def test_v2_default_is_2s_server_bucket() -> None:
    event = {"s": "p", "url": "https://x", "ec": "form", "ea": "submit", "ts": SERVER_MS - 100_000}
    expected = "v2:" + sha(
        f"3f2504e0-4f89-11d3-9a0c-0305e82c3301:form|submit|:https://x::{SERVER_MS // 2000 * 2000}"
    )
    assert compute_key(SITE, event, SERVER_MS, 2).key == expected


@given(
    ts=st.one_of(
        st.integers(min_value=0, max_value=2 * 10**13), st.floats(allow_nan=False, allow_infinity=False)
    )
)
def test_client_clock_cannot_change_a_click_key(ts: float) -> None:
    for event in (
        {"s": "p", "url": "https://x", "ea": "click"},
        {"s": "p", "url": "https://x", "ec": "click"},
        {"s": "p", "url": "https://x", "ea": "call_intent"},
    ):
        with_ts = compute_key(SITE, {**event, "ts": ts}, SERVER_MS, 2)
        without = compute_key(SITE, event, SERVER_MS, 2)
        assert with_ts == without
        assert with_ts.t_ms == SERVER_MS  # exact server ms


def test_click_rule_wins_over_page_rule() -> None:
    event = {"s": "p", "url": "https://x", "ec": "page", "ea": "click", "ts": SERVER_MS - 1000}
    assert compute_key(SITE, event, SERVER_MS, 2).t_ms == SERVER_MS
