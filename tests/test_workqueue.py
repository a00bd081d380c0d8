"""The work queue: de-duplicated keys, and one pending timer per key."""

from __future__ import annotations

import asyncio

from slmfleet.handlers.workqueue import WorkQueue


async def _drain(queue: WorkQueue, seconds: float) -> list[str]:
    got: list[str] = []
    timers = asyncio.create_task(queue.run_timers())
    try:
        async def take() -> None:
            while True:
                got.append(await queue.get())
        try:
            await asyncio.wait_for(take(), seconds)
        except asyncio.TimeoutError:
            pass
    finally:
        timers.cancel()
    return got


def test_a_key_added_many_times_is_handed_out_once():
    queue = WorkQueue()
    for _ in range(5):
        queue.add("a")
    queue.add("b")
    assert asyncio.run(_drain(queue, 0.05)) == ["a", "b"]


def test_repeated_timers_for_a_key_fire_once_at_the_earliest_time():
    # A periodic requeue asked for by every reconcile must not multiply into many timer chains.
    queue = WorkQueue()
    queue.add_after("a", 0.2)
    queue.add_after("a", 0.05)
    queue.add_after("a", 0.1)
    queue.add_after("b", 0.05)
    got = asyncio.run(_drain(queue, 0.4))
    assert sorted(got) == ["a", "b"]
