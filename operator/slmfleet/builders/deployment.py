"""The Deployment of one model revision (`<model>-<revision>`)."""

from __future__ import annotations

from typing import Any

from slmfleet.api.config import OperatorConfig
from slmfleet.api.smallmodel import Placement, SmallModelSpec
from slmfleet.builders.labels import revision_labels, selector_labels
from slmfleet.builders.names import revision_object_name
from slmfleet.builders.owner import ModelOwner
from slmfleet.builders.pod import build_pod_template

# Rolling back is the operator's job (each revision is its own Deployment); old ReplicaSets are
# kept only so `kubectl rollout history` shows the last in-place change.
REVISION_HISTORY_LIMIT = 2


def build_deployment(
    owner: ModelOwner,
    spec: SmallModelSpec,
    placement: Placement,
    revision: str,
    config: OperatorConfig,
    weights_disk_bytes: int | None = None,
    *,
    hardened: bool = True,
) -> dict[str, Any]:
    """The desired Deployment, for server-side apply. `weights_disk_bytes` is what the loader will
    write (the manifest's total), when known. `hardened`: the pods' shape (builders/pod.py); False
    only to keep a running revision as an earlier release built it. Raises UnsupportedSource (a
    ValueError) when the weights source cannot be served yet."""
    labels = revision_labels(owner.name, revision)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": revision_object_name(owner.name, revision),
            "namespace": owner.namespace,
            "labels": labels,
            "ownerReferences": [owner.owner_reference()],
        },
        "spec": {
            "replicas": spec.serving.replicas,
            "selector": {"matchLabels": selector_labels(owner.name, revision)},
            "strategy": rolling_update_strategy(spec.serving.replicas),
            "revisionHistoryLimit": REVISION_HISTORY_LIMIT,
            # A pod may legitimately stay Pending for the pending timeout and then load weights
            # for the startup timeout; only past both is the Deployment really stuck.
            "progressDeadlineSeconds": config.pending_timeout_seconds + config.startup_timeout_seconds,
            "template": build_pod_template(owner, spec, placement, revision, config, weights_disk_bytes,
                                           hardened=hardened),
        },
    }


def rolling_update_strategy(replicas: int) -> dict[str, Any]:
    """How a revision's own pods are replaced when its Deployment changes in place.

    New weights or serving config never roll in place (they are a new revision with a canary).
    In-place changes are a new placement (the old pods are usually Pending, not serving) or a new
    operator release (image, probes), and GPUs are scarce:

    - one replica: surge one pod and keep the old one serving until the new one is ready. A model
      with a single replica must not go dark for the minutes vLLM takes to load; if no spare GPU
      exists the rollout waits, visibly, while the old pod keeps serving.
    - several replicas: replace one at a time without surging, so an update never needs a GPU
      the model does not already hold, at the cost of one replica's capacity during the update.
    """
    if replicas <= 1:
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
