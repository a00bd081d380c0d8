"""The hash of what was applied, recorded on the object itself.

Server-side apply is always a request, even when it changes nothing. Every object the operator
applies carries the hash of its desired form in an annotation, so a planner compares hashes and a
resync that finds nothing to change sends nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

APPLIED_HASH = "slmfleet.io/applied-hash"


def applied_hash(obj: dict[str, Any]) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def with_applied_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with its own hash recorded in an annotation (computed before the annotation is added)."""
    digest = applied_hash(obj)
    metadata = dict(obj.get("metadata") or {})
    metadata["annotations"] = {**(metadata.get("annotations") or {}), APPLIED_HASH: digest}
    return {**obj, "metadata": metadata}
