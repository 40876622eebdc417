"""Idempotency keys (SPEC §4): pure functions of the site, the event and the server clock."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from uuid import UUID

V1_BUCKET_MS = 5_000
V2_HEARTBEAT_BUCKET_MS = 10_000
V2_PAGE_BUCKET_MS = 2_000
V2_DEFAULT_BUCKET_MS = 2_000
CLIENT_CLOCK_WINDOW_MS = 5 * 60 * 1000
SECONDS_THRESHOLD = 10**12


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    key: str
    version: int
    t_ms: int  # the time component hashed into the key: also the row's `bucket_at`

    @property
    def bucket_at(self) -> datetime:
        return bucket_instant(self.t_ms)


@lru_cache(maxsize=1024)
def bucket_instant(t_ms: int) -> datetime:
    """The instant of a key's time component (cached: the keys of a moment share a few buckets)."""
    return datetime.fromtimestamp(t_ms / 1000, tz=UTC)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def event_url(event: dict[str, Any]) -> str:
    """`url`, else legacy `u`, with surrounding whitespace stripped."""
    url = event.get("url")
    if not isinstance(url, str):
        url = event.get("u")
    return url.strip() if isinstance(url, str) else ""


def event_fingerprint(event: dict[str, Any]) -> str:
    """`meta.fp`, else `sid`, else empty."""
    meta = event.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("fp"), str):
        return str(meta["fp"])
    return _text(event.get("sid"))


def key_material(site_uuid: UUID, event: dict[str, Any], t_ms: int) -> str:
    """`{site_uuid}:{ec}|{ea}|{el}:{url}:{fp}:{t}` exactly as SPEC §4 writes it."""
    return (
        f"{str(site_uuid).lower()}:{_text(event.get('ec'))}|{_text(event.get('ea'))}|{_text(event.get('el'))}"
        f":{event_url(event)}:{event_fingerprint(event)}:{t_ms}"
    )


def floor_to(ms: int, bucket_ms: int) -> int:
    return (ms // bucket_ms) * bucket_ms


def client_clock_ms(ts: Any, server_ms: int) -> int | None:
    """The client's `ts` in ms when it is numeric and within ±5 min of the server clock, else None."""
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return None
    scaled = ts * 1000 if ts < SECONDS_THRESHOLD else ts
    # Not finite (also a float whose ms overflow to -inf, e.g. -1e306 seconds): unusable, like any
    # other `ts` outside the window. (An int is always finite; `math.isfinite` would raise on one
    # beyond a float's range.)
    if isinstance(scaled, float) and not math.isfinite(scaled):
        return None
    ms = math.floor(scaled)
    return ms if abs(ms - server_ms) <= CLIENT_CLOCK_WINDOW_MS else None


def v2_time_component(event: dict[str, Any], server_ms: int) -> int:
    """`t` for a v2 key: the bucket width by event kind, first matching rule wins (SPEC §4)."""
    ec, ea = _text(event.get("ec")), _text(event.get("ea"))
    if ea == "heartbeat":
        base = client_clock_ms(event.get("ts"), server_ms) or server_ms
        return floor_to(base, V2_HEARTBEAT_BUCKET_MS)
    if ea == "click" or ec == "click" or ea == "call_intent":
        return server_ms  # exact server ms: the client clock can never change a click's key
    if ec == "page" or ea == "page_view":
        base = client_clock_ms(event.get("ts"), server_ms) or server_ms
        return floor_to(base, V2_PAGE_BUCKET_MS)
    return floor_to(server_ms, V2_DEFAULT_BUCKET_MS)


def compute_key(site_uuid: UUID, event: dict[str, Any], server_ms: int, version: int = 1) -> IdempotencyKey:
    """The idempotency key of `event` received at `server_ms` (Unix ms, server clock)."""
    if version == 1:
        t_ms = floor_to(server_ms, V1_BUCKET_MS)
        prefix = ""
    elif version == 2:
        t_ms = v2_time_component(event, server_ms)
        prefix = "v2:"
    else:
        raise ValueError(f"unknown idempotency version {version}")
    digest = hashlib.sha256(key_material(site_uuid, event, t_ms).encode()).hexdigest()
    return IdempotencyKey(key=prefix + digest, version=version, t_ms=t_ms)
