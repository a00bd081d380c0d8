"""Services: one per revision (what a rollout's traffic split and the evaluator address) and the
model's public one, which follows the serving revision."""

from __future__ import annotations

from typing import Any

from slmfleet.api.config import OperatorConfig
from slmfleet.builders.labels import MODEL_LABEL, REVISION_LABEL, model_labels, revision_labels, selector_labels
from slmfleet.builders.names import model_service_name, revision_object_name
from slmfleet.builders.owner import ModelOwner
from slmfleet.builders.pod import PORT_NAME


def build_revision_service(owner: ModelOwner, revision: str, config: OperatorConfig) -> dict[str, Any]:
    """ClusterIP Service `<model>-<revision>` in front of that revision's pods."""
    return _service(
        owner,
        name=revision_object_name(owner.name, revision),
        labels=revision_labels(owner.name, revision),
        selector=selector_labels(owner.name, revision),
        config=config,
    )


CANARY_ANNOTATION = "slmfleet.io/canary"
"""On the model Service in replica-ratio mode: `<candidate revision>=<weight>`, the canary weight the
selector and replica counts implement (what a restarted operator reads back)."""


def build_model_service(owner: ModelOwner, serving_revision: str, config: OperatorConfig,
                        canary_revision: str | None = None, canary_weight: int = 0) -> dict[str, Any]:
    """ClusterIP Service `<model>`, the model's stable address, selecting the serving revision's pods.

    Promotion or rollback is a change of this selector: no new Service, no DNS change for clients.
    With a canary in replica-ratio mode (no Gateway API): at 0% it selects the serving revision
    only, between 0 and 100% every revision of the model (the share is the candidate's share of the
    ready pods, see traffic.replica_ratio_replicas), at 100% the candidate only.
    """
    selector = {MODEL_LABEL: owner.name, REVISION_LABEL: serving_revision}
    if canary_revision is not None and canary_weight >= 100:
        selector = {MODEL_LABEL: owner.name, REVISION_LABEL: canary_revision}
    elif canary_revision is not None and canary_weight > 0:
        selector = {MODEL_LABEL: owner.name}
    service = _service(
        owner,
        name=model_service_name(owner.name),
        # No revision label: the object is the model's, whatever revision it currently selects.
        labels=model_labels(owner.name),
        selector=selector,
        config=config,
    )
    if canary_revision is not None:
        service["metadata"]["annotations"] = {CANARY_ANNOTATION: f"{canary_revision}={canary_weight}"}
    return service


def canary_weight_of(service: dict[str, Any] | None, candidate_revision: str) -> int | None:
    """The canary weight a live model Service implements for `candidate_revision` (0 when it is
    about another revision or none; None without a Service)."""
    if service is None:
        return None
    value = ((service.get("metadata") or {}).get("annotations") or {}).get(CANARY_ANNOTATION, "")
    revision, _, weight = value.partition("=")
    if revision != candidate_revision or not weight.isdigit():
        return 0
    return int(weight)


def model_endpoint(owner: ModelOwner, config: OperatorConfig) -> str:
    """In-cluster base URL of the model's OpenAI-compatible API (for `status.endpoint`)."""
    return f"http://{model_service_name(owner.name)}.{owner.namespace}.svc:{config.vllm_port}/v1"


def _service(
    owner: ModelOwner, name: str, labels: dict[str, Any], selector: dict[str, Any], config: OperatorConfig
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels,
            "ownerReferences": [owner.owner_reference()],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": PORT_NAME, "port": config.vllm_port, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }
