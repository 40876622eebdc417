"""Sharing round trips between concurrent requests (group commit without a timer).

A request submits its item and awaits the result. When a slot is free the item runs at once (no
added latency at low load); while every slot is busy, arriving items queue, and the next free slot
takes all of them (up to `max_items`) as one batch. Under load batches grow by themselves.

With `overlap_after_s`, a further slot opens only once every running batch has run that long: items
arriving during a normal batch wait for it and go together in the next one (fewer, larger batches),
while a batch that stalls no longer holds up everything behind it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Awaitable[Sequence[R | Exception]]],
        *,
        max_items: int,
        max_concurrency: int,
        overlap_after_s: float | None = None,
        name: str = "batcher",
    ) -> None:
        if max_items < 1 or max_concurrency < 1:
            raise ValueError("max_items and max_concurrency must be >= 1")
        self._run_batch = run_batch
        self._max_items = max_items
        self._max_concurrency = max_concurrency
        self._overlap_after_s = overlap_after_s
        self._name = name
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._running: set[asyncio.Task[None]] = set()
        # Drains that may still take items. Decremented by the drain itself, in the same step in which
        # it finds the queue empty, so an item queued after that step always starts a new drain.
        self._active = 0
        # Loop time each running batch started at (overlap_after_s), and the timer that opens a slot.
        self._batch_started: dict[int, float] = {}
        self._overlap_timer: asyncio.TimerHandle | None = None

    async def submit(self, item: T) -> R:
        """Run `item` in the next batch and return its result (or raise its exception)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        self._open_slot(loop)
        return await future

    def _open_slot(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start a drain if a slot is free (and, with overlap_after_s, every running batch is old enough)."""
        if not self._queue or self._active >= self._max_concurrency:
            return
        if self._active and self._overlap_after_s is not None:
            youngest = max(self._batch_started.values(), default=loop.time())
            wait_s = youngest + self._overlap_after_s - loop.time()
            if wait_s > 0:
                if self._overlap_timer is None:
                    self._overlap_timer = loop.call_later(wait_s, self._overlap_due, loop)
                return
        self._active += 1
        task = asyncio.create_task(self._drain(), name=self._name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _overlap_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._overlap_timer = None
        self._open_slot(loop)

    async def _drain(self) -> None:
        slot = id(asyncio.current_task())
        try:
            await self._drain_queue(slot)
        finally:
            self._batch_started.pop(slot, None)
            self._active -= 1

    async def _drain_queue(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._max_items, len(self._queue)))]
            items = [item for item, _ in batch]
            self._batch_started[slot] = loop.time()
            try:
                results = await self._run_batch(items)
            except BaseException as exc:  # every waiter learns the batch's fate, then we stop or go on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
                if not isinstance(exc, Exception):
                    raise
                continue
            if len(results) != len(batch):
                error = RuntimeError(f"{self._name}: {len(results)} results for {len(batch)} items")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):  # that item alone failed
                    future.set_exception(result)
                else:
                    future.set_result(result)

    @property
    def in_flight(self) -> int:
        return len(self._queue) + len(self._running)

    async def wait_idle(self) -> None:
        """Wait until every submitted item has run (used on shutdown)."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)
