"""Tenants are untrusted: what a SmallModel names cannot take over objects it does not own."""

from __future__ import annotations

from kubernetes.client.exceptions import ApiException

from e2e.tests.test_smallmodel import (
    GROUP,
    PLURAL,
    QWEN_05B,
    VERSION,
    condition,
    create,
    events_for,
    model_body,
    wait_condition,
)
from e2e.tests.test_smallmodel import get as get_model
from e2e.wait import wait_for


def test_a_model_named_like_another_owners_service_leaves_it_untouched(operator, crs, core, apps, namespace):
    core.create_namespaced_service(namespace, {
        "metadata": {"name": "postgres", "labels": {"app": "postgres"}},
        "spec": {"selector": {"app": "postgres"}, "ports": [{"port": 5432}]}})
    create(crs, namespace, model_body("postgres", QWEN_05B, serving={"maxModelLen": 4096}))

    model = wait_condition(crs, namespace, "postgres", "Degraded", "True", "Conflict")
    assert "Service postgres" in condition(model, "Degraded")["message"]
    assert condition(model, "Ready")["status"] == "False"
    assert any(e.startswith("Conflict: Service postgres") for e in events_for(core, namespace, "postgres"))
    service = core.read_namespaced_service("postgres", namespace)
    assert service.spec.selector == {"app": "postgres"}, "the selector is not the model's"
    assert not service.metadata.owner_references, "no ownerReference added: deleting the model keeps it"
    assert service.metadata.managed_fields and all(f.manager != "slmfleet" for f in service.metadata.managed_fields)
    assert apps.list_namespaced_deployment(namespace).items == [], "nothing of the model's beside it"

    crs.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "postgres")

    def model_gone() -> bool:
        try:
            get_model(crs, namespace, "postgres")
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(model_gone, 30, what="the model deleted")
    assert core.read_namespaced_service("postgres", namespace).spec.selector == {"app": "postgres"}
