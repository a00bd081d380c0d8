"""The work queue: de-duplicated keys, and one pending timer per key."""

from __future__ import annotations

import asyncio

from slmfleet.controller.workqueue import WorkQueue


async def _drain(queue: WorkQueue, seconds: float) -> list[str]:
    got: list[str] = []
    timers = asyncio.create_task(queue.run_timers())
    try:
        async def take() -> None:
            while True:
                got.append(await queue.get())
        try:
            await asyncio.wait_for(take(), seconds)
        except TimeoutError:
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


def test_a_key_is_never_processed_twice_at_once_and_an_add_meanwhile_is_kept():
    async def scenario() -> list[tuple[str, str]]:
        queue = WorkQueue()
        trace: list[tuple[str, str]] = []
        running: set[str] = set()

        async def worker(n: int) -> None:
            while True:
                key = await queue.get()
                assert key not in running, f"{key} handed to two workers at once"
                running.add(key)
                trace.append(("start", key))
                if key == "a" and trace.count(("start", "a")) == 1:
                    queue.add("a")  # an event for "a" while it is being reconciled
                await asyncio.sleep(0.02)
                running.discard(key)
                trace.append(("end", key))
                queue.done(key)

        queue.add("a")
        queue.add("b")
        workers = [asyncio.create_task(worker(n)) for n in range(4)]
        await asyncio.sleep(0.2)
        for w in workers:
            w.cancel()
        results = await asyncio.gather(*workers, return_exceptions=True)
        # A worker's own assertion (a key handed out twice) must fail the test, not vanish.
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        assert not queue.busy
        return trace

    trace = asyncio.run(scenario())
    # "a" and "b" ran side by side; "a" ran a second time, after its first run ended, not during it.
    assert trace.index(("start", "b")) < trace.index(("end", "a"))
    starts = [i for i, t in enumerate(trace) if t == ("start", "a")]
    assert len(starts) == 2 and trace.index(("end", "a")) < starts[1]
