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
