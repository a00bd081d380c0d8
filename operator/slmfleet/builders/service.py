"""Services: one per revision (what a rollout's traffic split and the evaluator address) and the
model's public one, which follows the serving revision."""

from __future__ import annotations

from slmfleet.api.config import OperatorConfig
from slmfleet.builders.labels import MODEL_LABEL, REVISION_LABEL, model_labels, revision_labels, selector_labels
from slmfleet.builders.names import model_service_name, revision_object_name
from slmfleet.builders.owner import ModelOwner
from slmfleet.builders.pod import PORT_NAME


def build_revision_service(owner: ModelOwner, revision: str, config: OperatorConfig) -> dict:
    """ClusterIP Service `<model>-<revision>` in front of that revision's pods."""
    return _service(
        owner,
        name=revision_object_name(owner.name, revision),
        labels=revision_labels(owner.name, revision),
        selector=selector_labels(owner.name, revision),
        config=config,
    )


def build_model_service(owner: ModelOwner, serving_revision: str, config: OperatorConfig) -> dict:
    """ClusterIP Service `<model>`, the model's stable address, selecting the serving revision's pods.

    Promotion or rollback is a change of this selector: no new Service, no DNS change for clients.
    """
    return _service(
        owner,
        name=model_service_name(owner.name),
        # No revision label: the object is the model's, whatever revision it currently selects.
        labels=model_labels(owner.name),
        selector={MODEL_LABEL: owner.name, REVISION_LABEL: serving_revision},
        config=config,
    )


def model_endpoint(owner: ModelOwner, config: OperatorConfig) -> str:
    """In-cluster base URL of the model's OpenAI-compatible API (for `status.endpoint`)."""
    return f"http://{model_service_name(owner.name)}.{owner.namespace}.svc:{config.vllm_port}/v1"


def _service(owner: ModelOwner, name: str, labels: dict, selector: dict, config: OperatorConfig) -> dict:
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
