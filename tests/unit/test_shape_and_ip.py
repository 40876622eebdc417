import ipaddress
import uuid

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.events import (
    MAX_BODY_BYTES,
    MAX_NESTING,
    ShapeError,
    event_problem,
    header_text,
    nesting_depth,
    parse_sync_body,
)
from shared.rate_limit import LocalRateLimiter, RateLimitAsk, client_ip, retry_after_seconds
from shared.sites import Plan, Site


@pytest.mark.parametrize(
    "raw",
    [
        b'{"s": "a", "url": ""}',  # any string: billing must not depend on what the page reported
        b'{"s": "a", "url": "", "u": "https://x"}',
        b'{"s": "a", "u": "   "}',
        b'{"s": "a", "url": "u", "ts": "1700000000000"}',  # not a number: ignored, server time is used
        b'{"s": "a", "url": "u", "ts": true}',
        b'{"s": "a", "url": "u", "ts": {"ms": 1}}',
    ],
)
def test_events_the_spec_allows_are_not_refused(raw: bytes) -> None:
    """A 400 is never retried: refusing what SPEC §3/§4 allow would lose the event."""
    assert parse_sync_body(raw).events[0].error is None


def test_single_event_and_batch_parse() -> None:
    single = parse_sync_body(orjson.dumps({"s": "a", "url": "https://x", "extra": [1]}))
    assert not single.is_batch and single.site_public_id == "a" and single.events[0].error is None
    batch = parse_sync_body(orjson.dumps({"events": [{"s": "a", "url": "u"}, {"s": "a"}]}))
    assert batch.is_batch and [e.error for e in batch.events] == [None, "invalid_payload"]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "invalid_json"),
        (b"null", "invalid_json"),
        (b'"s"', "invalid_json"),
        (b'{"s": ""}', "invalid_payload"),
        (b'{"s": "a", "url": null}', "invalid_payload"),
        (b'{"s": "a", "url": 1}', "invalid_payload"),
        (b'{"s": "a", "url": null, "u": ["x"]}', "invalid_payload"),
        (b'{"s": "a", "url": "u", "ev": true}', "invalid_payload"),
        (b'{"s": "a", "url": "u", "meta": []}', "invalid_payload"),
        (b'{"s": "a", "url": "u", "meta": {"fp": 1}}', "invalid_payload"),
        (b'{"events": {}}', "invalid_batch"),
        (b'{"events": [1]}', "invalid_batch"),
        (b'{"events": [{"s": 1, "url": "u"}]}', "invalid_batch"),
    ],
)
def test_malformed_bodies(raw: bytes, code: str) -> None:
    with pytest.raises(ShapeError) as info:
        parse_sync_body(raw)
    assert info.value.code == code


def test_body_size_limit() -> None:
    with pytest.raises(ShapeError) as info:
        parse_sync_body(b" " * (MAX_BODY_BYTES + 1))
    assert info.value.code == "payload_too_large"


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_any_json_value_is_either_valid_or_a_shape_error(value: object) -> None:
    try:
        raw = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return
    try:
        body = parse_sync_body(raw)
    except ShapeError as exc:
        assert exc.code in {"invalid_json", "invalid_payload", "invalid_batch", "payload_too_large"}
    else:
        assert body.events and all(
            e.error is None or event_problem(e.event) or nesting_depth(e.event) > MAX_NESTING
            for e in body.events
        )


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"))


def test_client_ip() -> None:
    assert client_ip("198.51.100.1", "203.0.113.9", TRUSTED) == "198.51.100.1"  # peer not trusted
    assert client_ip("127.0.0.1", "203.0.113.9", TRUSTED) == "203.0.113.9"
    assert client_ip("127.0.0.1", "203.0.113.9, 10.1.2.3", TRUSTED) == "203.0.113.9"
    assert client_ip("127.0.0.1", "6.6.6.6, 203.0.113.9", TRUSTED) == "203.0.113.9"  # spoofed left hop
    # A hop with the client's port (some load balancers add it) is still that client, not the proxy.
    assert client_ip("127.0.0.1", "203.0.113.9:5555", TRUSTED) == "203.0.113.9"
    assert client_ip("127.0.0.1", "[2001:db8::1]:443", TRUSTED) == "2001:db8::1"
    assert client_ip("127.0.0.1", "2001:db8::1", TRUSTED) == "2001:db8::1"
    assert client_ip("127.0.0.1", "203.0.113.9:x", TRUSTED) == "127.0.0.1"  # not an address: the peer
    # aiohttp keeps undecodable header bytes as surrogates; ipaddress would take them as a scope id
    assert client_ip("127.0.0.1", "fe80::1%\udcff", TRUSTED) == "127.0.0.1"
    assert client_ip("127.0.0.1", "garbage", TRUSTED) == "127.0.0.1"
    assert client_ip("127.0.0.1", None, TRUSTED) == "127.0.0.1"
    assert client_ip("127.0.0.1", "203.0.113.9", ()) == "127.0.0.1"


def test_local_limiter_windows_and_batches() -> None:
    import uuid

    limiter = LocalRateLimiter()
    site = uuid.uuid4()
    assert limiter.admit(RateLimitAsk(site, "ip", 3, 5, 0))
    assert not limiter.admit(RateLimitAsk(site, "ip", 3, 5, 1000))  # a refused batch consumes nothing
    assert limiter.admit(RateLimitAsk(site, "ip", 2, 5, 2000))
    assert not limiter.admit(RateLimitAsk(site, "ip", 1, 5, 3000))
    assert limiter.admit(RateLimitAsk(site, "ip", 5, 5, 60_000))  # next window
    assert retry_after_seconds(59_001) == 1 and retry_after_seconds(0) == 60


def test_header_text_is_always_json_encodable() -> None:
    assert header_text("Mozilla/5.0") == "Mozilla/5.0"
    assert header_text("caf\u00e9") == "caf\u00e9"  # already text
    # Non-UTF-8 bytes arrive as lone surrogates (surrogateescape): read as ISO-8859-1.
    assert header_text("caf\udce9") == "caf\u00e9"
    assert header_text("\udcc3\udca9") == "\u00e9"  # UTF-8 bytes that came through escaped
    assert header_text("a\x00b") == "a\ufffdb"
    for value in ("caf\udce9", "Mozilla\udcff\udcfe/5.0", "\u00e9\x00"):
        orjson.dumps(header_text(value))


def test_origin_allow_list() -> None:
    def site(*origins: str) -> Site:
        return Site(uuid.uuid4(), "p", "n", tuple(origins), None, Plan(monthly_limit=1))

    assert site("https://Shop.Example:443/").allows_origin("https://shop.example")
    assert not site("https://shop.example").allows_origin("https://shop.example:8443")
    assert not site("https://shop.example").allows_origin("http://shop.example")
    assert site("*").allows_origin("https://any.example") and site().allows_origin(None)
    # Only an entry that is exactly `*` opens the site: a typo must not.
    assert not site("*/").allows_origin("https://evil.example")
    assert not site(" * ").allows_origin("null")
