"""Bodies Schemathesis found answering 500 (docs/openapi.yaml contract run): each must be a clean 400."""

from __future__ import annotations

import orjson
import pytest

from shared.events import MAX_NESTING, ShapeError, nesting_depth, parse_sync_body


@pytest.mark.parametrize("site", [{}, [], {"a": 1}, ["site-a"]])
def test_batch_with_an_unhashable_site_is_invalid_batch(site: object) -> None:
    body = orjson.dumps({"events": [{"s": site, "url": "https://example.com/"}]})
    with pytest.raises(ShapeError) as exc:
        parse_sync_body(body)
    assert exc.value.code == "invalid_batch"


def test_batch_whose_sites_differ_only_in_type_is_invalid_batch() -> None:
    body = orjson.dumps({"events": [{"s": "1", "url": "https://a/"}, {"s": 1, "url": "https://a/"}]})
    with pytest.raises(ShapeError) as exc:
        parse_sync_body(body)
    assert exc.value.code == "invalid_batch"


def _nested_json(levels: int) -> bytes:
    """`levels` arrays and objects, alternating, around a string (orjson cannot write > 254 levels)."""
    opening = b"".join(b"[" if level % 2 else b'{"k":' for level in range(levels))
    closing = b"".join(b"]" if level % 2 else b"}" for level in reversed(range(levels)))
    return opening + b'"leaf"' + closing


def _nested(levels: int) -> object:
    return orjson.loads(_nested_json(levels))


def assert_refused_as_too_deep(raw: bytes) -> None:
    """Alone: 400 invalid_payload naming the depth; in a batch: only that event is invalid."""
    with pytest.raises(ShapeError) as info:
        parse_sync_body(raw)
    assert info.value.code == "invalid_payload" and "deep" in info.value.detail
    fine = b'{"s":"site-a","url":"https://x.example/"}'
    batch = parse_sync_body(b'{"events":[' + fine + b"," + raw + b"]}")
    assert [shape.error for shape in batch.events] == [None, "invalid_payload"]


@pytest.mark.parametrize("levels", [MAX_NESTING - 1, MAX_NESTING + 1, 300])
def test_an_event_nested_too_deep_for_its_message_is_refused_at_the_door(levels: int) -> None:
    """orjson reads ~1,000 levels but writes 254, and a batch message adds two: such an event once passed
    the shape gate and then failed its whole capture group (500 for every request in it)."""
    raw = b'{"s":"site-a","url":"https://x.example/","x":' + _nested_json(levels) + b"}"
    event = orjson.loads(raw)
    depth = levels + 1  # the event object itself is a level
    if depth <= MAX_NESTING:
        body = parse_sync_body(raw)
        assert orjson.dumps({"events": [body.events[0].event]})  # the message can be built
        batch = parse_sync_body(orjson.dumps({"events": [event, event]}))
        assert [shape.error for shape in batch.events] == [None, None]
        return
    assert_refused_as_too_deep(raw)


def test_nesting_depth_counts_arrays_and_objects() -> None:
    assert nesting_depth("x") == 0 and nesting_depth([]) == 1 and nesting_depth({"a": [1, {"b": []}]}) == 4
    assert nesting_depth(_nested(500)) == MAX_NESTING + 1  # counted no further than needed


@pytest.mark.parametrize("levels", [500, 1000])
def test_a_deep_event_holding_a_nul_is_refused_not_a_recursion_error(levels: int) -> None:
    raw = b'{"s":"site-a","url":"https://x.example/","x":' + _nested_json(levels).replace(
        b'"leaf"', b'"a\\u0000b"'
    ) + b"}"
    assert_refused_as_too_deep(raw)


def test_an_ordinary_full_batch_is_not_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nesting walk costs ~2 µs per event in Python: a batch of shallow events (each with `meta`)
    has fewer opening brackets than MAX_NESTING, so it must never be walked."""
    import shared.events

    def walked(value: object, limit: int = 0) -> int:
        raise AssertionError("a shallow batch was walked")

    monkeypatch.setattr(shared.events, "nesting_depth", walked)
    event = {"s": "site-a", "url": "https://x.example/", "ec": "page", "meta": {"fp": "f", "tags": ["a"]}}
    batch = parse_sync_body(orjson.dumps({"events": [event] * 80}))
    assert [shape.error for shape in batch.events] == [None] * 80
