"""The kopf wiring: watch-fed indices and thin event handlers that queue model keys.

kopf's regular change handlers keep progress in annotations and finalizers, which are writes on
objects we want to leave alone. We only use what writes nothing: indices (in-memory caches fed by
watches; kopf calls no handler before every index has its initial listing, so a restarted
operator never decides from a half-empty view) and event handlers that turn watch events into
queued model keys. The indices keep slim copies: only what the planners read.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from slmfleet.api.smallmodel import GROUP, PLURAL, VERSION
from slmfleet.builders.labels import MODEL_LABEL
from slmfleet.controller.runtime import GPU_PREFIX, MANAGED, MR_PLURAL, ModelKey, Runtime

log = logging.getLogger("slmfleet.operator")


def _requests_gpu(spec: dict[str, Any]) -> bool:
    for container in (*(spec.get("containers") or []), *(spec.get("initContainers") or [])):
        resources = container.get("resources") or {}
        for kind in ("requests", "limits"):
            if any(k.startswith(GPU_PREFIX) for k in (resources.get(kind) or {})):
                return True
    return False


def node_changed(runtime: Runtime, event_type: str | None, body: Any, name: str) -> bool:
    """Whether the event changed what sizing reads of the node (remembering it for next time)."""
    seen = None if event_type == "DELETED" else _slim_node(body, name)
    if runtime.nodes_seen.get(name, ()) == seen:
        return False
    runtime.nodes_seen[name] = seen
    return True


def _slim_node(body: kopf.Body, name: str) -> dict[str, Any]:
    """What sizing reads of a node (inventory_from_nodes): labels, allocatable, schedulability, Ready."""
    spec, status = body.get("spec", {}), body.get("status", {})
    return {
        "metadata": {"name": name, "labels": dict(body.get("metadata", {}).get("labels") or {})},
        "spec": {"unschedulable": spec.get("unschedulable", False), "taints": list(spec.get("taints") or [])},
        "status": {
            "allocatable": dict(status.get("allocatable") or {}),
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")}
                for c in status.get("conditions") or []
                if c.get("type") == "Ready"
            ],
        },
    }


def _frees_gpus(event_type: str | None, spec: Any, status: Any) -> bool:
    """A GPU pod that went away or finished: its devices are free for a model that did not fit."""
    finished = (dict(status or {})).get("phase") in ("Succeeded", "Failed")
    return _requests_gpu(dict(spec or {})) and (event_type == "DELETED" or finished)


def _slim_pod(body: kopf.Body) -> dict[str, Any]:
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {})
    def containers(items: Any) -> list[dict[str, Any]]:
        return [{"name": c.get("name"), "resources": c.get("resources") or {}} for c in items or []]

    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("slmfleet.io/")},
            "creationTimestamp": meta.get("creationTimestamp"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            # Who controls it: a pod the operator talks to must be its Deployment's (observe.py).
            "ownerReferences": [{"kind": r.get("kind"), "name": r.get("name"), "controller": True}
                                for r in meta.get("ownerReferences") or [] if r.get("controller")],
        },
        "spec": {
            "nodeName": spec.get("nodeName"),
            "hostNetwork": bool(spec.get("hostNetwork")),
            "containers": containers(spec.get("containers")),
            "initContainers": containers(spec.get("initContainers")),
        },
        "status": {
            "phase": status.get("phase"),
            "podIP": status.get("podIP"),
            "conditions": list(status.get("conditions") or []),
            # The weight loader's verdict lives here (exit code and termination message).
            "initContainerStatuses": [
                {
                    "name": c.get("name"),
                    "image": c.get("image"),
                    "state": c.get("state") or {},
                    "lastState": c.get("lastState") or {},
                }
                for c in status.get("initContainerStatuses") or []
            ],
            # Why a container waits (an image that cannot be pulled degrades the model), and how it
            # last ended (a vLLM that fails to start is reported with its own error line).
            "containerStatuses": [
                {
                    "name": c.get("name"),
                    "image": c.get("image"),
                    "ready": bool(c.get("ready")),
                    "state": {"waiting": {"reason": waiting.get("reason")}}
                    if (waiting := (c.get("state") or {}).get("waiting"))
                    else {"terminated": _slim_termination(done)}
                    if (done := (c.get("state") or {}).get("terminated"))
                    else {},
                    "lastState": {"terminated": _slim_termination(done)}
                    if (done := (c.get("lastState") or {}).get("terminated"))
                    else {},
                }
                for c in status.get("containerStatuses") or []
            ],
        },
    }


# The kubelet keeps at most 4 KiB of a termination message; the tail holds the error.
MAX_TERMINATION_MESSAGE = 4096


def _slim_termination(done: dict[str, Any]) -> dict[str, Any]:
    return {"exitCode": done.get("exitCode"), "reason": done.get("reason"),
            "message": (done.get("message") or "")[-MAX_TERMINATION_MESSAGE:]}


def build_registry(runtime: Runtime) -> kopf.OperatorRegistry:
    """The operator's kopf handlers: indices (its view of the world) and event handlers (which
    model to look at again)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A plain registry has no fallback logins; use the kubeconfig / in-cluster config as the
        # write client does.
        return kopf.login_via_client(**kwargs)

    _register_indices(registry)
    _register_events(registry, runtime)
    return registry


def _register_indices(registry: kopf.OperatorRegistry) -> None:
    @kopf.index(GROUP, VERSION, PLURAL, id="slm_models", registry=registry)
    def slm_models(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[ModelKey, dict[str, Any]]:
        return {(namespace, name): dict(body)}

    def by_model(body: kopf.Body, namespace: str, labels: kopf.Labels) -> dict[ModelKey, dict[str, Any]] | None:
        model = labels.get(MODEL_LABEL)
        return {(namespace, model): dict(body)} if model else None

    @kopf.index("apps", "v1", "deployments", labels=MANAGED, id="slm_deployments", registry=registry)
    def slm_deployments(
        body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any
    ) -> dict[ModelKey, dict[str, Any]] | None:
        return by_model(body, namespace, labels)

    @kopf.index("v1", "services", labels=MANAGED, id="slm_services", registry=registry)
    def slm_services(
        body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any
    ) -> dict[ModelKey, dict[str, Any]] | None:
        return by_model(body, namespace, labels)

    @kopf.index("v1", "pods", labels={MODEL_LABEL: kopf.PRESENT}, id="slm_model_pods", registry=registry)
    def slm_model_pods(
        body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any
    ) -> dict[ModelKey, dict[str, Any]]:
        return {(namespace, labels[MODEL_LABEL]): _slim_pod(body)}

    @kopf.index("v1", "pods", id="slm_gpu_pods", registry=registry)
    def slm_gpu_pods(body: kopf.Body, spec: kopf.Spec, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, Any]] | None:
        """The pods sizing counts: every pod holding GPUs, and the operator's own model pods (a CPU
        placement holds its node's cores and memory)."""
        phase = body.get("status", {}).get("phase")
        if phase in ("Succeeded", "Failed") or not (_requests_gpu(dict(spec)) or MODEL_LABEL in labels):
            return None
        return {"all": _slim_pod(body)}

    @kopf.index("v1", "nodes", id="slm_nodes", registry=registry)
    def slm_nodes(body: kopf.Body, name: str, **_: Any) -> dict[str, dict[str, Any]]:
        return {"all": _slim_node(body, name)}

    @kopf.index(GROUP, VERSION, MR_PLURAL, id="slm_rollouts", registry=registry)
    def slm_rollouts(
        body: kopf.Body, namespace: str, spec: kopf.Spec, **_: Any
    ) -> dict[ModelKey, dict[str, Any]] | None:
        model = (spec.get("modelRef") or {}).get("name")
        return {(namespace, model): dict(body)} if model else None


def _register_events(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    @kopf.on.event(GROUP, VERSION, MR_PLURAL, registry=registry)
    def rollout_event(namespace: str, spec: kopf.Spec, **kwargs: Any) -> None:
        runtime.capture(kwargs)
        if model := (spec.get("modelRef") or {}).get("name"):
            runtime.queue.add((namespace, model))

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def model_event(namespace: str, name: str, **kwargs: Any) -> None:
        runtime.capture(kwargs)
        runtime.queue.add((namespace, name))

    @kopf.on.event("apps", "v1", "deployments", labels=MANAGED, registry=registry)
    @kopf.on.event("v1", "services", labels=MANAGED, registry=registry)
    def owned_event(namespace: str, labels: kopf.Labels, **kwargs: Any) -> None:
        runtime.capture(kwargs)
        if model := labels.get(MODEL_LABEL):
            runtime.queue.add((namespace, model))

    @kopf.on.event("v1", "pods", labels={MODEL_LABEL: kopf.PRESENT}, registry=registry)
    def model_pod_event(
        type: str | None, namespace: str, labels: kopf.Labels, spec: kopf.Spec, status: kopf.Status, **kwargs: Any
    ) -> None:
        runtime.capture(kwargs)
        runtime.queue.add((namespace, labels[MODEL_LABEL]))
        if _frees_gpus(type, spec, status):
            _enqueue_unsettled(runtime)

    @kopf.on.event("v1", "nodes", registry=registry)
    def node_event(type: str | None, body: kopf.Body, name: str, **kwargs: Any) -> None:
        # New or changed capacity can place a model that did not fit, or free a Pending one. Most
        # node events are heartbeats that change nothing sizing reads: those wake no model.
        runtime.capture(kwargs)
        if node_changed(runtime, type, body, name):
            _enqueue_unsettled(runtime)

    @kopf.on.event("v1", "pods", labels={MODEL_LABEL: kopf.ABSENT}, registry=registry)
    def other_pod_event(type: str | None, spec: kopf.Spec, status: kopf.Status, **kwargs: Any) -> None:
        runtime.capture(kwargs)
        if _frees_gpus(type, spec, status):
            _enqueue_unsettled(runtime)


def _enqueue_unsettled(runtime: Runtime) -> None:
    """Models whose placement could change with the inventory: unplaced or not Ready."""
    if runtime.indices is None:
        return
    for key, per_model in list(runtime.conditions.items()):
        if per_model.get("Degraded") == "True" or per_model.get("Ready") != "True":
            runtime.queue.add(key)
