"""A deprecated base model: which revision the model serves instead, and what to say about it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from slmfleet.api.smallmodel import RevisionRecord, SmallModel
from slmfleet.rollout.deprecations import Deprecations, HistoryEntry, last_known_good

GOOD_OUTCOMES = ("Serving", "Replaced", "Promoted")


@dataclass(frozen=True)
class Deprecated:
    """The model's base is deprecated: what it serves instead, and what to say."""

    message: str
    target: RevisionRecord | None  # the revision to serve instead; None: nothing to fall back to


def deprecated_base(model: SmallModel, deprecations: Deprecations, now: dt.datetime) -> Deprecated | None:
    """Whether spec.baseModel is deprecated, and if so the newest revision in the history whose base
    is not and which passed (it was promoted, or it was the stable revision); failing that, the
    revision serving now, which keeps serving. The operator never edits the spec: it serves the
    fallback's digest with the spec's other settings, and says so in the status."""
    deprecation = deprecations.lookup(model.spec.base_model, now)
    if deprecation is None:
        return None
    history = [h for h in model.status.history if h.uri]
    entries = [HistoryEntry(h.revision, h.digest, h.base_model, "Serving" if h.outcome in GOOD_OUTCOMES else h.outcome)
               for h in history]
    good = last_known_good(entries, deprecations, now)
    why = f"base model {deprecation.base_model} is deprecated ({deprecation.reason})"
    if good is not None:
        target = next(h for h in reversed(history) if h.revision == good.revision)
        return Deprecated(f"{why}: serving the last known good revision {target.revision} (digest {target.digest}, "
                          f"base {target.base_model or 'unknown'}); fix spec.source and spec.baseModel to end this", target)
    serving = next((h for h in reversed(history) if h.revision == model.status.serving_revision), None)
    if serving is not None:
        return Deprecated(f"{why}, and no earlier revision with a base that is not deprecated passed: revision "
                          f"{serving.revision} keeps serving", serving)
    return Deprecated(f"{why}: it is not deployed", None)


def serve_record(model: SmallModel, record: RevisionRecord) -> SmallModel:
    """The model with the source and base of a revision in its history (its other settings kept)."""
    source = model.spec.source.model_copy(update={"uri": record.uri, "digest": record.digest})
    spec = model.spec.model_copy(update={"source": source, "base_model": record.base_model})
    return model.model_copy(update={"spec": spec})


def served_model(model: SmallModel, deprecations: Deprecations, now: dt.datetime) -> SmallModel:
    """The SmallModel as it is to be served (its source replaced when its base is deprecated): what
    the weights are read for."""
    found = deprecated_base(model, deprecations, now)
    return serve_record(model, found.target) if found is not None and found.target is not None else model
