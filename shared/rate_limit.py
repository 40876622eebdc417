"""The rate-limit gate (SPEC §3 gate 3): per (site, client IP), fixed 60 s windows in Redis, a local
in-process limiter while Redis is down (never a closed gate)."""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import redis.asyncio as aioredis

from shared.batching import MicroBatcher
from shared.logging import get_logger
from shared.redis_scripts import GateScripts
from shared.settings import IpNetwork

WINDOW_MS = 60_000
# A second Redis call opens only once the running one is this old: checks arriving meanwhile share the
# next call (fewer, larger calls: +3-5 % single events/s at the bench peak, docs/performance.md), and a
# call stalled on Redis does not hold up the requests behind it.
OVERLAP_AFTER_S = 0.003
REDIS_ERRORS = (aioredis.RedisError, OSError, TimeoutError)

log = get_logger("rate_limit")


@dataclass(frozen=True, slots=True)
class RateLimitAsk:
    site_id: UUID
    client_ip: str
    units: int
    limit: int
    now_ms: int

    @property
    def window(self) -> int:
        return self.now_ms // WINDOW_MS


@dataclass(frozen=True, slots=True)
class RateLimitVerdict:
    allowed: bool
    retry_after_s: int
    local: bool  # decided by the in-process limiter because Redis was unreachable
    ask: RateLimitAsk | None = None  # what was counted (for `RateLimiter.give_back`)


def retry_after_seconds(now_ms: int) -> int:
    """Whole seconds, rounded up, to the end of the current window."""
    window_end = (now_ms // WINDOW_MS + 1) * WINDOW_MS
    return max(1, math.ceil((window_end - now_ms) / 1000))


def client_ip(peer: str | None, forwarded_for: str | None, trusted: Sequence[IpNetwork]) -> str:
    """The client address: the peer, unless the peer is a trusted proxy; then the right-most
    X-Forwarded-For hop that is not itself a trusted proxy."""
    peer = peer or "unknown"
    if not forwarded_for or not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [_without_port(hop.strip()) for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop if _is_ip(hop) else peer
    return hops[0] if hops and _is_ip(hops[0]) else peer


def _without_port(hop: str) -> str:
    """`203.0.113.9:5555` → `203.0.113.9`, `[2001:db8::1]:443` → `2001:db8::1` (some load balancers
    append the client's port); anything else unchanged."""
    if hop.startswith("["):
        host, bracket, _ = hop[1:].partition("]")
        return host if bracket else hop
    if hop.count(":") == 1:
        host, _, port = hop.partition(":")
        return host if port.isdigit() else hop
    return hop


def _is_ip(value: str) -> bool:
    if not value.isascii():  # ipaddress accepts any IPv6 scope id, even undecodable header bytes
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, trusted: Sequence[IpNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


class LocalRateLimiter:
    """The same fixed windows, counted in this process only."""

    def __init__(self) -> None:
        self._windows: dict[tuple[UUID, str, int], int] = {}
        self._current_window = -1

    def admit(self, ask: RateLimitAsk) -> bool:
        if ask.window != self._current_window:
            self._windows = {k: v for k, v in self._windows.items() if k[2] >= ask.window}
            self._current_window = ask.window
        key = (ask.site_id, ask.client_ip, ask.window)
        used = self._windows.get(key, 0)
        if used + ask.units > ask.limit:
            return False
        self._windows[key] = used + ask.units
        return True

    def give_back(self, ask: RateLimitAsk) -> None:
        key = (ask.site_id, ask.client_ip, ask.window)
        if key in self._windows:
            self._windows[key] = max(0, self._windows[key] - ask.units)


class RateLimiter:
    """Checks of concurrent requests share one Redis script call."""

    def __init__(
        self,
        scripts: GateScripts,
        *,
        redis_retry_s: float = 1.0,
        overlap_after_s: float | None = OVERLAP_AFTER_S,
    ) -> None:
        self._scripts = scripts
        self._local = LocalRateLimiter()
        self._redis_down_until = 0.0
        self._redis_retry_s = redis_retry_s
        self._batcher: MicroBatcher[RateLimitAsk, RateLimitVerdict] = MicroBatcher(
            self._check_many,
            max_items=256,
            max_concurrency=2,
            overlap_after_s=overlap_after_s,
            name="rate-limit",
        )

    async def check(self, site_id: UUID, ip: str, units: int, limit: int) -> RateLimitVerdict:
        ask = RateLimitAsk(site_id, ip, units, limit, int(time.time() * 1000))
        return await self._batcher.submit(ask)

    async def give_back(self, verdict: RateLimitVerdict) -> None:
        """Return an admitted request's units: it was answered 500 `billing_gate_closed`, which must
        touch no counter (SPEC §1.6), so the client's retry is not refused for a request never served.
        Best effort: a Redis failure here only leaves the window as it was."""
        ask = verdict.ask
        if not verdict.allowed or ask is None:
            return
        if verdict.local:
            self._local.give_back(ask)
            return
        key = f"rl:{ask.site_id}:{ask.client_ip}:{ask.window}"
        try:
            # The quota's give-back script: DECRBY on keys that still exist.
            await self._scripts.run(self._scripts.release_quota, [key], [ask.units])
        except REDIS_ERRORS as exc:
            log.warning("rate_limit_give_back_failed", error=str(exc) or type(exc).__name__)

    async def _check_many(self, asks: list[RateLimitAsk]) -> list[RateLimitVerdict]:
        if time.monotonic() >= self._redis_down_until:
            keys = [f"rl:{a.site_id}:{a.client_ip}:{a.window}" for a in asks]
            args: list[int] = []
            for ask in asks:
                args += [ask.units, ask.limit, WINDOW_MS * 2]
            try:
                admitted = await self._scripts.run(self._scripts.rate_limit, keys, args)
            except REDIS_ERRORS as exc:
                self._redis_down_until = time.monotonic() + self._redis_retry_s
                log.warning("rate_limit_redis_unavailable", error=str(exc) or type(exc).__name__)
            else:
                return [
                    RateLimitVerdict(bool(ok), retry_after_seconds(a.now_ms), local=False, ask=a)
                    for a, ok in zip(asks, admitted, strict=True)
                ]
        return [
            RateLimitVerdict(self._local.admit(a), retry_after_seconds(a.now_ms), local=True, ask=a)
            for a in asks
        ]
