"""The operator's view of the cluster: stores fed by kopf's watch events, checked against full lists.

Why not kopf's indices: kopf holds back every handler until all indices have their first listing,
and it does so by waking every waiting object for every object it indexes, which grew to minutes
of CPU at a thousand models before /healthz turned healthy. Its indices also keep objects deleted
while a watch was gone (a 410 re-list adds what exists, and nothing says what went), so a pod
deleted in the gap would hold its GPUs in the operator's eyes for good.

So the operator lists each kind itself, pages at a time, before its workers start (the view is
complete from the first reconcile), and again every `resyncSeconds`: what a listing lacks and no
watch event touched since the listing began is gone, and is dropped. Between listings the watch
events keep the stores current. An event always wins over a listing that started before it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Hashable, Iterable, Iterator
from typing import Any


class Store:
    """Objects by id (uid or name), grouped under a key: what `get(key)` returns, as kopf's
    indices did (a model's Deployments, all GPU pods under "all").

    `packed`: values are kept as compact JSON and decoded on each read. For whole objects read a
    model at a time (models, Deployments, Services): as dicts they take four times the room, and a
    thousand models' worth was a fifth of the operator's memory. A read returns a copy of its own."""

    def __init__(self, packed: bool = False) -> None:
        self._packed = packed
        self._by_key: dict[Hashable, dict[str, Any]] = {}
        self._key_of: dict[str, Hashable] = {}
        self._touched: dict[str, float] = {}  # id -> when an event last set or deleted it (monotonic)

    def _pack(self, value: Any) -> Any:
        return json.dumps(value, separators=(",", ":"), sort_keys=True).encode() if self._packed else value

    def _unpack(self, stored: Any) -> Any:
        return json.loads(stored) if self._packed else stored

    def _same(self, stored: Any, packed: Any) -> bool:
        # Packed: the same content is no change. Not packed: the value is a new object or not.
        return stored == packed if self._packed else stored is packed

    def get(self, key: Hashable, default: Iterable[Any] = ()) -> Iterable[Any]:
        found = self._by_key.get(key)
        return [self._unpack(v) for v in found.values()] if found else default

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._by_key))

    def __len__(self) -> int:
        return len(self._key_of)

    def value_of(self, id_: str) -> Any:
        key = self._key_of.get(id_)
        return None if key is None else self._unpack(self._by_key[key][id_])

    def _stored(self, id_: str) -> Any:
        key = self._key_of.get(id_)
        return None if key is None else self._by_key[key].get(id_)

    def put(self, id_: str, key: Hashable | None, value: Any, *, at: float | None = None) -> set[Hashable]:
        """Put (key and value) or drop (key None) the object `id_`; the keys whose content changed."""
        self._touched[id_] = time.monotonic() if at is None else at
        changed: set[Hashable] = set()
        old_key = self._key_of.get(id_)
        if old_key is not None and old_key != key:
            group = self._by_key.get(old_key, {})
            group.pop(id_, None)
            if not group:
                self._by_key.pop(old_key, None)
            del self._key_of[id_]
            changed.add(old_key)
        if key is not None:
            group = self._by_key.setdefault(key, {})
            stored = self._pack(value)
            if id_ not in group or not self._same(group[id_], stored):
                group[id_] = stored
                changed.add(key)
            self._key_of[id_] = key
        return changed

    def resync(self, listed: dict[str, tuple[Hashable | None, Any]],
               started: float) -> list[tuple[str, Hashable | None, Any, set[Hashable]]]:
        """Bring the store in line with a full listing that began at `started`: add what it has and
        no event has touched since, drop what it lacks and no event has touched since. What
        changed: (id, key or None, value, the keys whose content changed)."""
        changes: list[tuple[str, Hashable | None, Any, set[Hashable]]] = []
        for id_, (key, value) in listed.items():
            if self._touched.get(id_, float("-inf")) < started and (self._key_of.get(id_) != key
                                                                     or self._stored(id_) != self._pack(value)):
                changes.append((id_, key, value, self.put(id_, key, value, at=started)))
        for id_ in [i for i in self._key_of if i not in listed and self._touched.get(i, float("-inf")) < started]:
            changes.append((id_, None, None, self.put(id_, None, None, at=started)))
        # Deletions older than the listing are in it now (as absences): no need to remember them.
        for id_ in [i for i, t in self._touched.items() if t < started and i not in self._key_of]:
            del self._touched[id_]
        return changes
