"""Reads of the outside world that must not hold a worker (object storage, the candidate pods'
/metrics): one task per key with an overall deadline. A reconcile that needs one starts it and
goes on with what is known; every model that asked is queued again when it ends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger("slmfleet.operator")

T = TypeVar("T")

# Results are kept until replaced or forgotten; past this many, the oldest go (read again if asked).
MAX_RESULTS = 4096


class BackgroundReads(Generic[T]):
    def __init__(self, requeue: Callable[[Hashable], None], deadline_seconds: float, what: str,
                 max_results: int = MAX_RESULTS) -> None:
        self.max_results = max_results
        self._requeue = requeue
        self.deadline_seconds = deadline_seconds
        self.what = what  # for the log: "weights read", "live metrics scrape"
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._askers: dict[str, set[Hashable]] = {}
        self._results: dict[str, tuple[float, T]] = {}  # key -> (monotonic time it ended, value)

    def result(self, key: str) -> tuple[float, T] | None:
        """The last read's value and when it ended; None before the first one ends."""
        return self._results.get(key)

    def running(self, key: str) -> bool:
        task = self._tasks.get(key)
        return task is not None and not task.done()

    def start(self, key: str, asker: Hashable, read: Callable[[], Awaitable[T]],
              on_timeout: Callable[[float], T]) -> None:
        """Start `read` unless one of `key` runs; either way `asker` is queued again when it ends.
        A read past the deadline ends with `on_timeout(deadline)`; one that raises keeps the last value."""
        self._askers.setdefault(key, set()).add(asker)
        if not self.running(key):
            self._tasks[key] = asyncio.get_running_loop().create_task(
                self._run(key, read, on_timeout), name=f"slmfleet {self.what} {key}")

    async def _run(self, key: str, read: Callable[[], Awaitable[T]], on_timeout: Callable[[float], T]) -> None:
        try:
            value = await asyncio.wait_for(read(), self.deadline_seconds)
        except TimeoutError:
            log.warning("%s %s: no result within %.0fs", self.what, key, self.deadline_seconds)
            value = on_timeout(self.deadline_seconds)
        except Exception:
            log.warning("%s %s failed", self.what, key, exc_info=True)
            self._ended(key)
            return
        self._results.pop(key, None)
        self._results[key] = (time.monotonic(), value)
        while len(self._results) > self.max_results:  # the oldest result goes first
            del self._results[next(iter(self._results))]
        self._ended(key)

    def _ended(self, key: str) -> None:
        if self._tasks.get(key) is asyncio.current_task():
            del self._tasks[key]
        for asker in self._askers.pop(key, set()):
            self._requeue(asker)

    def forget(self, keep: Callable[[str], bool]) -> None:
        """Drop the results and cancel the reads whose key `keep` rejects."""
        for key in [k for k in self._results if not keep(k)]:
            del self._results[key]
        for key in [k for k in self._tasks if not keep(k)]:
            self._tasks.pop(key).cancel()
            self._askers.pop(key, None)

    async def close(self) -> None:
        await cancel_all(self._tasks)


async def cancel_all(tasks: dict[str, asyncio.Task[None]]) -> None:
    """Cancel the tasks (and forget them), then wait for them to end."""
    running = list(tasks.values())
    tasks.clear()
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
