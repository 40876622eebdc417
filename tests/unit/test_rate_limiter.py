"""How the rate-limit gate groups its Redis calls (the script itself is tested against Redis in
tests/integration/test_sync_gates.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any, cast

from shared.rate_limit import OVERLAP_AFTER_S, LocalRateLimiter, RateLimitAsk, RateLimiter
from shared.redis_scripts import GateScripts

SITE = uuid.UUID(int=7)


class HeldScripts:
    """Stands in for GateScripts: records each call's keys, holds the first call until released."""

    rate_limit = object()

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()

    async def run(self, _script: object, keys: Sequence[str], args: Sequence[int]) -> list[int]:
        self.calls.append(list(keys))
        if len(self.calls) == 1:
            await self.release.wait()
        return [1] * len(keys)


async def checks_while_first_call_runs(overlap_after_s: float | None) -> list[list[str]]:
    scripts = HeldScripts()
    limiter = RateLimiter(cast(Any, scripts), overlap_after_s=overlap_after_s)
    first = asyncio.create_task(limiter.check(SITE, "10.0.0.1", 1, 100))
    while not scripts.calls:
        await asyncio.sleep(0)
    rest = []
    for wave in range(2):  # two waves of checks, a moment apart, well under the overlap threshold
        rest += [asyncio.create_task(limiter.check(SITE, f"10.0.{wave}.{n}", 1, 100)) for n in range(5)]
        await asyncio.sleep(0.001)
    scripts.release.set()
    verdicts = await asyncio.gather(first, *rest)
    assert all(v.allowed and not v.local for v in verdicts)
    return scripts.calls


async def test_checks_arriving_during_a_call_share_the_next_one() -> None:
    calls = await checks_while_first_call_runs(overlap_after_s=0.5)
    assert [len(keys) for keys in calls] == [1, 10]


async def test_without_the_overlap_rule_a_second_call_starts_at_once() -> None:
    """The baseline the rule changes: two free slots split the waiting checks over more calls."""
    calls = await checks_while_first_call_runs(overlap_after_s=None)
    assert [len(keys) for keys in calls] == [1, 5, 5]


def test_the_gate_uses_the_overlap_rule_by_default() -> None:
    limiter = RateLimiter(cast(GateScripts, HeldScripts()))
    assert limiter._batcher._overlap_after_s == OVERLAP_AFTER_S  # noqa: SLF001 - the wiring under test


def test_local_limiter_gives_back_the_units_of_a_request_not_served() -> None:
    limiter = LocalRateLimiter()
    site = uuid.uuid4()
    ask = RateLimitAsk(site, "203.0.113.9", 2, 3, 1_764_000_000_000)
    assert limiter.admit(ask)
    assert not limiter.admit(ask)  # 2 + 2 > 3
    limiter.give_back(ask)
    assert limiter.admit(ask)
