"""Fleet-wide billing counters (SPEC §11): totals in one Redis hash, shared by every process.

`add` never blocks or fails the caller: increments collect in process and a supervised task flushes
them every 0.5 s. While Redis is down they keep accumulating here (the per-process fallback) and reach
the fleet totals when it returns; `close` flushes what is left.

Each flush is exactly-once: the batch gets an id, and one Lua script sets the batch's marker key and
applies every HINCRBY atomically. A flush whose reply was lost (timeout, dropped connection) is retried
later with the same id and contents, so it can neither be lost nor counted twice.

Every increment is also counted in this process's Prometheus counters (`shared.prom`), which are per
process by design: Prometheus sums them across instances.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from shared.logging import get_logger
from shared.prom import BILLING_COUNTER_NAMES, count_billing
from shared.redis_scripts import script_source

COUNTERS_KEY = "billing:counters"
COUNTER_NAMES = BILLING_COUNTER_NAMES
# A retried batch must find its marker, so it outlives the Redis outages a process is expected to ride
# out; short enough that the markers of busy processes (two a second each) stay a few MB.
FLUSH_MARKER_TTL_S = 3600

_REDIS_ERRORS = (TimeoutError, aioredis.RedisError, OSError)

log = get_logger("billing_counters")


@dataclass(frozen=True, slots=True)
class _Batch:
    batch_id: str
    amounts: dict[str, int]


class BillingCounters:
    def __init__(self, redis: aioredis.Redis, *, key: str = COUNTERS_KEY) -> None:
        self._redis = redis
        self._key = key
        self._pending: Counter[str] = Counter()
        # A batch sent to Redis whose outcome is unknown; retried, same id, before anything newer.
        self._unconfirmed: _Batch | None = None
        self._flush_lock = asyncio.Lock()
        self._script: AsyncScript = redis.register_script(script_source("billing_counters_flush"))

    def add(self, name: str, amount: int = 1) -> None:
        """Count `amount` more of `name` (a SPEC §11 counter)."""
        if name not in COUNTER_NAMES:
            raise ValueError(f"unknown billing counter {name!r}")
        if amount < 0:
            raise ValueError("billing counters only go up")
        if amount:
            self._pending[name] += amount
            count_billing(name, amount)

    @property
    def pending(self) -> dict[str, int]:
        """Increments of this process not yet known to be in the fleet totals."""
        local = Counter(self._pending)
        if self._unconfirmed is not None:
            local.update(self._unconfirmed.amounts)
        return dict(+local)

    async def _apply(self, batch: _Batch) -> None:
        args: list[str | int] = [FLUSH_MARKER_TTL_S]
        for name, amount in sorted(batch.amounts.items()):
            args += [name, amount]
        await self._script(keys=[self._key, f"{self._key}:flush:{batch.batch_id}"], args=args)

    async def flush(self) -> bool:
        """Move pending increments into the Redis hash; False (and nothing lost) when Redis is down."""
        async with self._flush_lock:
            # First the batch of an earlier failed flush (same id), then whatever accumulated since.
            while self._unconfirmed is not None or +self._pending:
                if self._unconfirmed is None:
                    self._unconfirmed = _Batch(uuid.uuid4().hex, dict(+self._pending))
                    self._pending = Counter()
                try:
                    await self._apply(self._unconfirmed)
                except _REDIS_ERRORS as exc:
                    log.warning(
                        "billing_counters_flush_failed",
                        error=str(exc) or type(exc).__name__,
                        unflushed=self.pending,
                    )
                    return False
                self._unconfirmed = None
            return True

    async def fleet_totals(self) -> dict[str, int]:
        """The Redis hash alone (raises when Redis is unreachable)."""
        raw = await self._redis.hgetall(self._key)
        fleet = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
        return {name: fleet.get(name, 0) for name in COUNTER_NAMES}

    async def totals(self) -> dict[str, int]:
        """Fleet totals plus this process's unflushed increments (this process alone when Redis is down)."""
        await self.flush()
        fleet: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        try:
            fleet = await self.fleet_totals()
        except _REDIS_ERRORS as exc:
            log.warning("billing_counters_read_failed", error=str(exc) or type(exc).__name__)
        local = self.pending
        return {name: fleet[name] + local.get(name, 0) for name in COUNTER_NAMES}

    async def run(self, interval_s: float = 0.5) -> None:
        """Flush forever (a supervised side task)."""
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()

    async def close(self) -> None:
        """Last flush at shutdown; what Redis does not take is logged, since it is lost with the process."""
        if not await self.flush():
            log.error("billing_counters_lost_at_shutdown", unflushed=self.pending)
