"""Label keys and values on everything the operator creates for a model.

The `app.kubernetes.io/*` labels are the recommended common labels (dashboards and `kubectl get -l`
understand them); the `slmfleet.io/*` labels are the ones selectors use. Selectors only ever use
the model and revision labels so that adding a descriptive label later never has to touch a
Deployment's immutable selector.
"""

from __future__ import annotations

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
PART_OF_LABEL = "app.kubernetes.io/part-of"
MODEL_LABEL = "slmfleet.io/model"
REVISION_LABEL = "slmfleet.io/revision"

APP_NAME = "vllm"
MANAGER = "slmfleet"


def model_labels(model: str) -> dict[str, str]:
    """Labels of objects that belong to the model as a whole (its public Service)."""
    return {
        NAME_LABEL: APP_NAME,
        INSTANCE_LABEL: model,
        MANAGED_BY_LABEL: MANAGER,
        PART_OF_LABEL: MANAGER,
        MODEL_LABEL: model,
    }


def revision_labels(model: str, revision: str) -> dict[str, str]:
    """Labels of one revision's objects: its Deployment, pods and Service."""
    return model_labels(model) | {REVISION_LABEL: revision}


def selector_labels(model: str, revision: str) -> dict[str, str]:
    """The labels that pick out one revision's pods."""
    return {MODEL_LABEL: model, REVISION_LABEL: revision}


def model_selector(model: str) -> dict[str, str]:
    """The label that picks out every pod of the model, whatever its revision."""
    return {MODEL_LABEL: model}

# Annotation on pods: the placement key (`<resource>|<product>|<count>`) the pod was built for.
PLACEMENT_ANNOTATION = "slmfleet.io/placement"
