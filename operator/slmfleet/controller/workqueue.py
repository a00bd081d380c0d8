"""A deduplicating work queue with delayed requeue, as controller-runtime has.

Watch events of many kinds (the model itself, its Deployments and pods, any Node, any GPU pod)
all come down to "look at model X again". Queuing keys rather than events collapses bursts into
one reconcile. Several workers take keys at once, but a key is handed out to one worker at a time:
a key added while it is being processed is queued again when its worker calls `done`, so two
reconciles of one model never overlap and no event is lost. `add_after` is the only timer: for
changes that arrive without an event (a pod that has been Pending too long).

Keys wait at one of three priorities, so that a user's edit does not queue behind a thousand other
models: URGENT for a change of a model's spec, NORMAL for what the watches bring, BACKGROUND for
the look at every model a (re)start or a full listing makes. A key added again at a higher priority
moves up; within a priority the order is first come, first served.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Hashable

URGENT, NORMAL, BACKGROUND = 0, 1, 2


class WorkQueue:
    def __init__(self) -> None:
        self._levels: tuple[deque[Hashable], ...] = (deque(), deque(), deque())
        self._queued: dict[Hashable, int] = {}  # key -> the priority it waits at (entries elsewhere are stale)
        self._available = asyncio.Event()
        self._processing: set[Hashable] = set()
        self._dirty: dict[Hashable, int] = {}  # added while processing: queued again on done()
        self.busy_since: float | None = None  # when the queue last went from idle to busy (monotonic)
        self._delayed: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}  # the earliest pending timer of each key
        self._tiebreak = itertools.count()
        self._wakeup = asyncio.Event()

    def add(self, key: Hashable, priority: int = NORMAL) -> None:
        if key in self._processing:
            self._dirty[key] = min(priority, self._dirty.get(key, priority))
            return
        waiting = self._queued.get(key)
        if waiting is not None and waiting <= priority:
            return
        if not self.busy:
            self.busy_since = time.monotonic()
        self._queued[key] = priority
        self._levels[priority].append(key)
        self._available.set()

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
        """The next key, now the caller's until it calls `done(key)`."""
        while True:
            for priority, level in enumerate(self._levels):
                while level:
                    key = level.popleft()
                    if self._queued.get(key) == priority:  # else it moved up, and was taken there
                        del self._queued[key]
                        self._processing.add(key)
                        return key
            self._available.clear()
            await self._available.wait()

    def done(self, key: Hashable) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self.add(key, self._dirty.pop(key))
        if not self.busy:
            self.busy_since = None

    @property
    def busy(self) -> bool:
        """Keys are waiting or being processed."""
        return bool(self._processing) or bool(self._queued)

    def __len__(self) -> int:
        return len(self._queued)

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
            except TimeoutError:
                pass
