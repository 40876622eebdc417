"""Fleet-wide billing counters (SPEC §11): totals in one Redis hash, shared by every process.

`add` never blocks or fails the caller: increments collect in process and a supervised task flushes
them with one HINCRBY pipeline. While Redis is down they keep accumulating here (the per-process
fallback) and reach the fleet totals when it returns; `close` flushes what is left.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import redis.asyncio as aioredis

from shared.logging import get_logger

COUNTERS_KEY = "billing:counters"
COUNTER_NAMES = (
    "billing_ingest_allowed_total",
    "billing_ingest_duplicate_total",
    "billing_ingest_rejected_quota_total",
    "billing_ingest_rate_limited_total",
    "billing_ingest_overage_total",
    "billing_ingest_degraded_total",
    "billing_reconciliation_runs_ok_total",
    "billing_reconciliation_runs_failed_total",
)

log = get_logger("billing_counters")


class BillingCounters:
    def __init__(self, redis: aioredis.Redis, *, key: str = COUNTERS_KEY) -> None:
        self._redis = redis
        self._key = key
        self._pending: Counter[str] = Counter()
        self._flush_lock = asyncio.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        """Count `amount` more of `name` (a SPEC §11 counter)."""
        if name not in COUNTER_NAMES:
            raise ValueError(f"unknown billing counter {name!r}")
        if amount:
            self._pending[name] += amount

    @property
    def pending(self) -> dict[str, int]:
        return dict(self._pending)

    async def flush(self) -> bool:
        """Move pending increments into the Redis hash; False (and nothing lost) when Redis is down."""
        async with self._flush_lock:
            batch = +self._pending
            if not batch:
                return True
            self._pending.subtract(batch)
            self._pending = +self._pending
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for name, amount in batch.items():
                        pipe.hincrby(self._key, name, amount)
                    await pipe.execute()
            except (TimeoutError, aioredis.RedisError, OSError) as exc:
                # Not flushed: put the increments back so the next flush carries them.
                self._pending.update(batch)
                log.warning("billing_counters_flush_failed", error=str(exc) or type(exc).__name__)
                return False
            return True

    async def totals(self) -> dict[str, int]:
        """Fleet totals plus this process's unflushed increments (this process alone when Redis is down)."""
        await self.flush()
        fleet: dict[str, int] = {}
        try:
            raw = await self._redis.hgetall(self._key)
            fleet = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}
        except (TimeoutError, aioredis.RedisError, OSError) as exc:
            log.warning("billing_counters_read_failed", error=str(exc) or type(exc).__name__)
        return {name: fleet.get(name, 0) + self._pending.get(name, 0) for name in COUNTER_NAMES}

    async def run(self, interval_s: float = 0.5) -> None:
        """Flush forever (a supervised side task)."""
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()

    async def close(self) -> None:
        await self.flush()
