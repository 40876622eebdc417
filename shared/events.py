"""The shape gate (SPEC §3 gate 1): pure validation of `/api/sync` bodies, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

MAX_BODY_BYTES = 256 * 1024
MAX_BATCH = 100
MAX_SITE_ID = 128
MAX_URL = 4096
MAX_LABEL = 256
# Arrays and objects inside an event, counted from the event itself. orjson reads ~1,000 levels but
# writes only 254, and a batch message wraps its events two levels deeper: an event nested past that
# would be accepted, then fail its group's capture when its message is built. 250 is what the message
# can hold; it is also the bound below which a body needs no walk at all (it has fewer opening
# brackets), so ordinary batches, whose events and `meta` objects add ~2 brackets each, pay nothing.
MAX_NESTING = 250
UTF8_BOM = b"\xef\xbb\xbf"


class ShapeError(Exception):
    """The whole request is malformed: answered 400 with `code`."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class EventShape:
    """One event of a request: the object, or why it is invalid (`error` = an error code)."""

    event: dict[str, Any]
    error: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class SyncBody:
    site_public_id: str
    events: list[EventShape]
    is_batch: bool


def _optional_string(event: dict[str, Any], key: str, max_len: int | None) -> str | None:
    value = event.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        return f"`{key}` must be a string"
    if max_len is not None and len(value) > max_len:
        return f"`{key}` is longer than {max_len} characters"
    return None


def event_problem(event: Any) -> str | None:
    """Why `event` breaks the field rules of SPEC §3, or None when it is well-formed."""
    if not isinstance(event, dict):
        return "an event must be a JSON object"
    site = event.get("s")
    if not isinstance(site, str) or not site:
        return "`s` (site public id) is required and must be a non-empty string"
    if len(site) > MAX_SITE_ID:
        return f"`s` is longer than {MAX_SITE_ID} characters"
    url_key = "url" if event.get("url") is not None else "u"
    url = event.get(url_key)
    if not isinstance(url, str):
        return "`url` (or legacy `u`) is required and must be a string"
    if len(url) > MAX_URL:
        return f"`{url_key}` is longer than {MAX_URL} characters"
    return _optional_field_problem(event)


def _optional_field_problem(event: dict[str, Any]) -> str | None:
    for key, max_len in (("ec", MAX_LABEL), ("ea", MAX_LABEL), ("el", MAX_LABEL), ("sid", None), ("r", None)):
        problem = _optional_string(event, key, max_len)
        if problem:
            return problem
    ev = event.get("ev")
    if ev is not None and (isinstance(ev, bool) or not isinstance(ev, int | float | str)):
        return "`ev` must be a number or a string"
    meta = event.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            return "`meta` must be an object"
        if meta.get("fp") is not None and not isinstance(meta["fp"], str):
            return "`meta.fp` must be a string"
    return None


def parse_sync_body(raw: bytes) -> SyncBody:
    """Parse and validate a single event or a batch `{"events": [...]}` (ShapeError when malformed).

    A malformed event inside a well-formed batch is not an error of the request: it comes back as an
    EventShape with `error = "invalid_payload"` and the other events proceed.
    """
    if len(raw) > MAX_BODY_BYTES:
        raise ShapeError("payload_too_large", f"body is larger than {MAX_BODY_BYTES} bytes")
    if raw[:3] == UTF8_BOM:  # RFC 8259 §8.1 lets a parser ignore it; .NET and PowerShell senders add it
        raw = raw[3:]
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ShapeError("invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ShapeError("invalid_json", "body must be a JSON object")
    # Postgres text and jsonb cannot hold U+0000, and JSON can only carry it escaped: look for it only
    # when the escape is in the body at all.
    check_nul = b"\\u0000" in raw
    # Nesting can only exceed the limit when the body has more opening brackets than the limit.
    check_nesting = raw.count(b"[") + raw.count(b"{") > MAX_NESTING
    if "events" in data:
        return _parse_batch(data["events"], check_nul, check_nesting)
    problem = event_problem(data) or _content_problem(data, check_nul, check_nesting)
    if problem:
        raise ShapeError("invalid_payload", problem)
    return SyncBody(site_public_id=data["s"], events=[EventShape(data)], is_batch=False)


NUL_PROBLEM = "strings must not contain the NUL character (\\u0000)"
NESTING_PROBLEM = f"an event must not nest arrays and objects more than {MAX_NESTING} levels deep"


def header_text(value: str) -> str:
    """A request header's value as text an event can carry (the `ua` it is published and buffered with).

    HTTP parsers hand non-UTF-8 bytes over as lone surrogates, which JSON cannot encode: such a value is
    read as ISO-8859-1 (HTTP's `obs-text`), so a Latin-1 `User-Agent` keeps its meaning and nothing is
    lost. NUL, which a `jsonb` fallback-buffer row cannot hold, becomes U+FFFD.
    """
    if value.isascii():
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    raw = value.encode("utf-8", "surrogateescape")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("iso-8859-1")
    return text.replace("\x00", "\ufffd")


def _content_problem(event: Any, check_nul: bool, check_nesting: bool) -> str | None:
    """What the field rules do not see: NUL characters and nesting, checked only when the raw body
    could hold them."""
    # Nesting first: `contains_nul` recurses, so it may only walk events known to be shallow.
    if check_nesting and nesting_depth(event) > MAX_NESTING:
        return NESTING_PROBLEM
    if check_nul and contains_nul(event):
        return NUL_PROBLEM
    return None


def nesting_depth(value: Any, limit: int = MAX_NESTING + 1) -> int:
    """Levels of arrays and objects in `value` (a scalar is 0), counted no further than `limit`."""
    if isinstance(value, dict):
        children: Any = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return 0
    if limit <= 1:
        return 1
    return 1 + max((nesting_depth(child, limit - 1) for child in children), default=0)


def contains_nul(value: Any) -> bool:
    """True when any string (or object key) inside `value` contains U+0000."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(contains_nul(k) or contains_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(contains_nul(v) for v in value)
    return False


def _parse_batch(events: Any, check_nul: bool = False, check_nesting: bool = False) -> SyncBody:
    if not isinstance(events, list) or not 1 <= len(events) <= MAX_BATCH:
        raise ShapeError("invalid_batch", f"`events` must be an array of 1-{MAX_BATCH} events")
    if not all(isinstance(e, dict) for e in events):
        raise ShapeError("invalid_batch", "every element of `events` must be an object")
    # Compared by equality, not hashed: `s` may be any JSON value here, lists and objects included.
    site = events[0].get("s")
    if any(e.get("s") != site for e in events):
        raise ShapeError("invalid_batch", "every event of a batch must name the same site in `s`")
    if not isinstance(site, str) or not site or len(site) > MAX_SITE_ID or "\x00" in site:
        raise ShapeError("invalid_batch", "the batch's `s` must be a non-empty string of at most 128 chars")
    shapes = []
    for event in events:
        problem = event_problem(event) or _content_problem(event, check_nul, check_nesting)
        shapes.append(EventShape(event, "invalid_payload", problem) if problem else EventShape(event))
    return SyncBody(site_public_id=site, events=shapes, is_batch=True)
