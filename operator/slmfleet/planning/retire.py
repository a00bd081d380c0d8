"""Which revisions' objects go, and when: a revision that is neither wanted nor serving retires,
except for the grace period a ModelRollout gives a revision replaced by a promotion."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from slmfleet.api.smallmodel import RevisionRecord
from slmfleet.api.timestamps import parse_rfc3339
from slmfleet.planning.common import Deletion, EventNote, revision_of_object, sooner


def retirement_grace(history: Iterable[RevisionRecord], delay_seconds: int | None,
                     now: dt.datetime) -> dict[str, dt.datetime]:
    """Revisions replaced under a ModelRollout whose grace period (its scaleDownDelaySeconds from
    when their successor started serving) is still running: revision -> when it ends. The history
    is the clock, not the rollout that replaced them: a rollout that starts during the grace period
    must not keep them for good."""
    if not delay_seconds:
        return {}
    records = list(history)
    grace: dict[str, dt.datetime] = {}
    for i, record in enumerate(records):
        if record.outcome == "RolledBack":
            continue  # it never served
        # Replaced by a promotion (a promoted revision too, when a later rollout promotes another):
        # the grace period is for going back. A revision replaced by a deprecation's fallback goes.
        successor = next((h for h in records[i + 1:] if h.outcome != "RolledBack"), None)
        if successor is None or successor.outcome != "Promoted":
            continue
        since = parse_rfc3339(successor.since)
        if since is not None and now < (ends := since + dt.timedelta(seconds=delay_seconds)):
            grace[record.revision] = ends
    return grace


def retirements(objects: Iterable[dict[str, Any]], keep: set[str | None], grace: dict[str, dt.datetime],
                now: dt.datetime) -> tuple[list[Deletion], float | None]:
    """The Deployments and Services of revisions that are neither kept nor in their grace period,
    and when to look again for those that are."""
    delete: list[Deletion] = []
    requeue: float | None = None
    for obj in objects:
        obj_revision = revision_of_object(obj)
        if obj_revision is None or obj_revision in keep or obj["metadata"].get("deletionTimestamp") is not None:
            continue
        if obj_revision in grace:
            requeue = sooner(requeue, (grace[obj_revision] - now).total_seconds() + 0.5)
            continue
        delete.append(Deletion(obj["apiVersion"], obj["kind"], obj["metadata"]["name"], obj["metadata"].get("uid", "")))
    return delete, requeue


def retired_events(delete: Iterable[Deletion], serving: str | None) -> list[EventNote]:
    """The Event for the revisions a plan retires (by their Deployments), if any."""
    names = sorted({d.name for d in delete if d.kind == "Deployment"})
    if not names:
        return []
    who = f"revision {serving} serves" if serving else "no revision serves"
    return [EventNote("Normal", "RevisionRetired", f"{who}; removed {', '.join(names)}")]


def retire(objects: Iterable[dict[str, Any]], keep: set[str | None], history: Iterable[RevisionRecord],
           scale_down_delay: int | None, serving: str | None,
           now: dt.datetime) -> tuple[list[Deletion], list[EventNote], float | None]:
    """What goes now, the Event that says so, and when to look again for what is in its grace."""
    delete, retry = retirements(objects, keep, retirement_grace(history, scale_down_delay, now), now)
    return delete, retired_events(delete, serving), retry
