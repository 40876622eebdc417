"""Sharing round trips between concurrent requests (group commit without a timer).

A request submits its item and awaits the result. When a slot is free the item runs at once (no
added latency at low load); while every slot is busy, arriving items queue, and the next free slot
takes all of them (up to `max_items`) as one batch. Under load batches grow by themselves.
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
        name: str = "batcher",
    ) -> None:
        if max_items < 1 or max_concurrency < 1:
            raise ValueError("max_items and max_concurrency must be >= 1")
        self._run_batch = run_batch
        self._max_items = max_items
        self._max_concurrency = max_concurrency
        self._name = name
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._running: set[asyncio.Task[None]] = set()
        # Drains that may still take items. Decremented by the drain itself, in the same step in which
        # it finds the queue empty, so an item queued after that step always starts a new drain.
        self._active = 0

    async def submit(self, item: T) -> R:
        """Run `item` in the next batch and return its result (or raise its exception)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._active < self._max_concurrency:
            self._active += 1
            task = asyncio.create_task(self._drain(), name=self._name)
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return await future

    async def _drain(self) -> None:
        try:
            await self._drain_queue()
        finally:
            self._active -= 1

    async def _drain_queue(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._max_items, len(self._queue)))]
            items = [item for item, _ in batch]
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
