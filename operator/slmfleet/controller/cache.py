"""Read your writes: the operator's own writes and deletions, until the watch brings them back.

The stores (stores.py) are fed by watches, which lag behind our writes. A reconcile that runs before the
watch catches up would decide from the past (apply again, or miss what it just created), so what
we wrote stands in for the cached version until the cache has caught up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slmfleet.builders.labels import MODEL_LABEL


@dataclass
class WriteCache:
    # Our own writes, until the watch brings them back: (kind, namespace, name) ->
    # (resourceVersion the cache had before the write, the object the API server returned).
    # The older versions are all those we saw before our writes: two writes may come before the
    # watch delivers the first.
    own_writes: dict[tuple[str, str, str], tuple[frozenset[str | None], dict[str, Any]]] = field(default_factory=dict)
    # Objects we deleted, until the cache drops them: (kind, namespace, name, uid, owning model).
    deleted: set[tuple[str, str, str, str, str]] = field(default_factory=set)
    # (kind, namespace) -> the names in own_writes: `fresh` looks at one model's kind and namespace,
    # not at every write the operator remembers (a thousand models creating at once).
    _scopes: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def remember(self, before: dict[str, Any] | None, after: dict[str, Any]) -> None:
        meta = after["metadata"]
        if "managedFields" in meta:  # nothing reads them, and they weigh the most
            after = {**after, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
            meta = after["metadata"]
        key = (after["kind"], meta["namespace"], meta["name"])
        self._scopes.setdefault(key[:2], set()).add(key[2])
        older = {(before or {}).get("metadata", {}).get("resourceVersion")}
        if key in self.own_writes:
            previous_older, previous = self.own_writes[key]
            older |= previous_older | {previous["metadata"].get("resourceVersion")}
        self.own_writes[key] = (frozenset(older), after)

    def fresh(self, kind: str, namespace: str, cached: list[dict[str, Any]], owner: str = "") -> list[dict[str, Any]]:
        """`cached` objects of `kind` owned by model `owner`, with our newer writes in place of what
        the cache still lacks, and without what we deleted."""
        out = []
        seen = set()
        still_cached = set()
        for obj in cached:
            name = obj["metadata"]["name"]
            gone = (kind, namespace, name, obj["metadata"].get("uid", ""), owner)
            if gone in self.deleted:
                still_cached.add(gone)
                continue
            seen.add(name)
            write = self.own_writes.get((kind, namespace, name))
            if write and obj["metadata"].get("resourceVersion") in write[0]:
                out.append(write[1])
            else:
                self.forget(kind, namespace, name)
                out.append(obj)
        if self.deleted:
            self.deleted -= {d for d in self.deleted if d[:2] == (kind, namespace) and d[4] == owner} - still_cached
        for name in list(self._scopes.get((kind, namespace), ())):
            older, obj = self.own_writes[(kind, namespace, name)]
            if name in seen or None not in older:
                continue
            if owner and (obj["metadata"].get("labels") or {}).get(MODEL_LABEL, obj["metadata"]["name"]) != owner:
                continue
            out.append(obj)
        return out

    def forget(self, kind: str, namespace: str, name: str) -> None:
        if self.own_writes.pop((kind, namespace, name), None) is not None:
            scope = self._scopes.get((kind, namespace))
            if scope is not None:
                scope.discard(name)
                if not scope:
                    del self._scopes[(kind, namespace)]
