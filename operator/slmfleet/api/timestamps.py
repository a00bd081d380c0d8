"""Times on the wire: RFC 3339 in UTC to the second, as Kubernetes writes metav1.Time."""

from __future__ import annotations

import datetime as dt


def rfc3339(moment: dt.datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")  # a naive time would be read as local time
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str | None) -> dt.datetime | None:
    """The moment a stamp names (fractions and offsets accepted); None for an empty one."""
    if not text:
        return None
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
