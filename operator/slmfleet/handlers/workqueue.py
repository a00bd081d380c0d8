"""A deduplicating work queue with delayed requeue, as controller-runtime has.

Watch events of many kinds (the model itself, its Deployments and pods, any Node, any GPU pod)
all come down to "look at model X again". Queuing keys rather than events collapses bursts into
one reconcile, and one worker processing keys in order keeps reconciles of one model from
overlapping. `add_after` is the only timer: for changes that arrive without an event (a pod that
has been Pending too long).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Hashable


class WorkQueue:
    def __init__(self) -> None:
        self._ready: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._delayed: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}  # the earliest pending timer of each key
        self._tiebreak = itertools.count()
        self._wakeup = asyncio.Event()

    def add(self, key: Hashable) -> None:
        if key not in self._queued:
            self._queued.add(key)
            self._ready.put_nowait(key)

    def add_after(self, key: Hashable, seconds: float) -> None:
        """Look at `key` again in `seconds` at the latest. One timer per key: a reconcile that asks
        for a periodic look again would otherwise start one more chain of timers per event."""
        due = time.monotonic() + max(0.0, seconds)
        if key in self._due and self._due[key] <= due:
            return
        self._due[key] = due
        heapq.heappush(self._delayed, (due, next(self._tiebreak), key))
        self._wakeup.set()

    async def get(self) -> Hashable:
        key = await self._ready.get()
        self._queued.discard(key)
        return key

    def __len__(self) -> int:
        return self._ready.qsize()

    async def run_timers(self) -> None:
        """Moves delayed keys to the ready queue when they are due; runs until cancelled."""
        while True:
            self._wakeup.clear()
            now = time.monotonic()
            while self._delayed and self._delayed[0][0] <= now:
                due, _, key = heapq.heappop(self._delayed)
                if self._due.get(key) == due:  # else superseded by an earlier timer, already fired
                    del self._due[key]
                    self.add(key)
            timeout = self._delayed[0][0] - now if self._delayed else None
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass
