"""A model revision: the hash of what makes its pods what they are.

Like a Deployment's pod-template hash, but over the spec instead of the pod template: the weights
digest plus the serving config. Changing either makes a new revision, which gets its own
Deployment and Service and goes through a rollout. Two things are deliberately left out:

- `serving.replicas`: scaling is not a new model; it resizes the revision in place.
- the placement (and `spec.resources`, which only constrain it): moving to other GPUs, e.g. the
  next fallback when pods stay Pending, updates the revision's Deployment in place.
"""

from __future__ import annotations

import hashlib
import json

from slmfleet.api.smallmodel import SmallModelSpec

REVISION_LENGTH = 10


def revision_of(spec: SmallModelSpec) -> str:
    """10 lowercase hex characters identifying the spec's weights and serving config."""
    # exclude_defaults: a field written out at its default value is the same revision as the field
    # left out, and a later release that adds an optional serving field does not give every
    # existing model a new revision (and a rollout) on upgrade.
    serving = spec.serving.model_dump(mode="json", exclude={"replicas"}, exclude_defaults=True)
    payload = {"digest": spec.source.digest, "serving": serving}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:REVISION_LENGTH]
