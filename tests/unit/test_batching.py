import asyncio

import pytest

from shared.batching import MicroBatcher


async def test_concurrent_items_share_batches_and_keep_order() -> None:
    seen: list[list[int]] = []
    gate = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        seen.append(items)
        await gate.wait()
        return [i * 10 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_items=50, max_concurrency=1)
    tasks = [asyncio.create_task(batcher.submit(0))]
    while not seen:  # the first item runs alone, at once
        await asyncio.sleep(0)
    tasks += [asyncio.create_task(batcher.submit(i)) for i in range(1, 20)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == [i * 10 for i in range(20)]
    assert seen[0] == [0] and seen[1] == list(range(1, 20))


async def test_an_item_submitted_as_the_last_drain_ends_still_runs() -> None:
    async def run(items: list[int]) -> list[int]:
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_items=10, max_concurrency=1)
    for i in range(50):  # each waiter resumes right as the previous drain finishes
        assert await asyncio.wait_for(batcher.submit(i), timeout=5) == i


async def test_a_failed_batch_fails_its_items_only() -> None:
    async def run(items: list[int]) -> list[int]:
        if 3 in items:
            raise ValueError("boom")
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_items=1, max_concurrency=1)
    with pytest.raises(ValueError):
        await batcher.submit(3)
    assert await asyncio.wait_for(batcher.submit(4), timeout=5) == 4


async def overlap_batcher(
    overlap_after_s: float,
) -> tuple[MicroBatcher[int, int], list[list[int]], asyncio.Event, asyncio.Task[int]]:
    """A two-slot batcher whose first batch, item 0, is running and holds until the event is set."""
    seen: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        seen.append(items)
        if items == [0]:
            await release.wait()
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(
        run, max_items=50, max_concurrency=2, overlap_after_s=overlap_after_s
    )
    first = asyncio.create_task(batcher.submit(0))
    while not seen:
        await asyncio.sleep(0)
    return batcher, seen, release, first


async def test_with_overlap_items_wait_for_a_young_batch_and_share_the_next() -> None:
    batcher, seen, release, first = await overlap_batcher(60.0)
    later = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
    for _ in range(20):  # plenty of loop turns: without the overlap rule a second batch would start
        await asyncio.sleep(0)
    assert seen == [[0]]
    release.set()
    assert await asyncio.gather(first, *later) == list(range(6))
    assert seen == [[0], [1, 2, 3, 4, 5]]


async def test_with_overlap_a_stalled_batch_lets_the_next_one_start() -> None:
    batcher, seen, release, stalled = await overlap_batcher(0.02)
    waiting = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    # The second slot opens once the stalled batch is 20 ms old, and serves both waiting items.
    assert await asyncio.wait_for(asyncio.gather(*waiting), timeout=5) == [1, 2]
    assert seen == [[0], [1, 2]] and not stalled.done()
    release.set()
    assert await stalled == 0
