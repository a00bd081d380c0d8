"""The kopf wiring: thin event handlers that keep the operator's stores (stores.py) current and
queue model keys.

kopf's regular change handlers keep progress in annotations and finalizers, which are writes on
objects we want to leave alone, and its indices hold every handler back until all are listed (see
stores.py). We only use what writes nothing: event handlers, which turn watch events into entries
of the stores and into queued model keys. The stores keep slim copies: only what the planners read.
The same functions turn a full listing into entries (`sync`), so a listing and a watch event
describe an object alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import kopf

from slmfleet.api.smallmodel import GROUP, PLURAL, VERSION
from slmfleet.builders.labels import MANAGED_BY_LABEL, MODEL_LABEL
from slmfleet.controller import reservations
from slmfleet.controller.runtime import GPU_PREFIX, MANAGED, MR_PLURAL, Runtime
from slmfleet.controller.workqueue import BACKGROUND, NORMAL, URGENT
from slmfleet.k8s.connection import ApiConnection

log = logging.getLogger("slmfleet.operator")

Entry = tuple[str, str, Hashable | None, Any]  # (store, object id, key or None, slim value)


def _requests_gpu(spec: dict[str, Any]) -> bool:
    for container in (*(spec.get("containers") or []), *(spec.get("initContainers") or [])):
        resources = container.get("resources") or {}
        for kind in ("requests", "limits"):
            if any(k.startswith(GPU_PREFIX) for k in (resources.get(kind) or {})):
                return True
    return False


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


def _slim(body: Any) -> dict[str, Any]:
    """The object without its managedFields, which nothing here reads and which weigh the most."""
    out = dict(body)
    meta = dict(out.get("metadata") or {})
    meta.pop("managedFields", None)
    out["metadata"] = meta
    return out


def _uid(meta: Any) -> str:
    return str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")


def model_entries(body: Any) -> list[Entry]:
    meta = body.get("metadata") or {}
    return [("slm_models", _uid(meta), (meta.get("namespace"), meta.get("name")), _slim(body))]


def rollout_entries(body: Any) -> list[Entry]:
    meta = body.get("metadata") or {}
    model = ((body.get("spec") or {}).get("modelRef") or {}).get("name")
    return [("slm_rollouts", _uid(meta), (meta.get("namespace"), model) if model else None, _slim(body))]


def owned_entries(store: str) -> Callable[[Any], list[Entry]]:
    def entries(body: Any) -> list[Entry]:
        meta = body.get("metadata") or {}
        model = (meta.get("labels") or {}).get(MODEL_LABEL)
        return [(store, _uid(meta), (meta.get("namespace"), model) if model else None, _slim(body))]
    return entries


def pod_entries(body: Any) -> list[Entry]:
    """A model pod goes under its model; the pods sizing counts (every pod holding GPUs, and the
    operator's own model pods: a CPU placement holds its node's cores and memory) under "all"."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    model = (meta.get("labels") or {}).get(MODEL_LABEL)
    finished = (body.get("status") or {}).get("phase") in ("Succeeded", "Failed")
    counted = not finished and (bool(model) or _requests_gpu(dict(spec)))
    slim = _slim_pod(body) if model or counted else None  # other workloads' pods: nothing to keep
    return [("slm_model_pods", _uid(meta), (meta.get("namespace"), model) if model else None, slim),
            ("slm_gpu_pods", _uid(meta), "all" if counted else None, slim)]


def node_entries(body: Any) -> list[Entry]:
    name = str((body.get("metadata") or {}).get("name", ""))
    return [("slm_nodes", name, "all", _slim_node(body, name))]


@dataclass(frozen=True)
class Kind:
    """A watched kind: how to list it, and the store entries an object of it makes."""

    api_version: str
    plural: str
    stores: tuple[str, ...]
    entries: Callable[[Any], list[Entry]]
    label_selector: str | None = None
    namespaced: bool = True


MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}=slmfleet"
KINDS = (
    Kind(f"{GROUP}/{VERSION}", PLURAL, ("slm_models",), model_entries),
    Kind(f"{GROUP}/{VERSION}", MR_PLURAL, ("slm_rollouts",), rollout_entries),
    Kind("apps/v1", "deployments", ("slm_deployments",), owned_entries("slm_deployments"), MANAGED_SELECTOR),
    Kind("v1", "services", ("slm_services",), owned_entries("slm_services"), MANAGED_SELECTOR),
    Kind("v1", "pods", ("slm_model_pods", "slm_gpu_pods"), pod_entries),
    Kind("v1", "nodes", ("slm_nodes",), node_entries, namespaced=False),
)


def record(runtime: Runtime, entries: list[Entry], gone: bool, priority: int = NORMAL) -> None:
    """Watch events: put the entries in their stores (or drop them), and queue what changed."""
    for store, id_, key, value in entries:
        previous = runtime.indices[store].value_of(id_) if store == "slm_models" else None
        changed = runtime.indices[store].put(id_, None if gone else key, value)
        _after_change(runtime, store, id_, None if gone else key, value, changed, previous, priority)


def _after_change(runtime: Runtime, store: str, id_: str, key: Hashable | None, value: Any,
                  changed: set[Hashable], previous: Any = None, priority: int = NORMAL) -> None:
    if store == "slm_gpu_pods":
        was_held = runtime.cluster.holds(id_)
        if runtime.cluster.set_pod(id_, value if key is not None else None) and was_held:
            _enqueue_unsettled(runtime)  # devices may have come free for a model that did not fit
        return
    if store == "slm_nodes":
        if runtime.cluster.set_node(id_, value if key is not None else None):
            _enqueue_unsettled(runtime)  # new or changed capacity; heartbeats change nothing here
        return
    if store in ("slm_deployments", "slm_model_pods"):
        for model in changed:
            if isinstance(model, tuple) and reservations.refresh(runtime, model) < 0 and store == "slm_deployments":
                _enqueue_unsettled(runtime)  # a Deployment scaled down or gone: what it reserved is free
    if store == "slm_models" and previous is not None and value is not None and key is not None and priority == NORMAL:
        if (previous.get("metadata") or {}).get("generation") != (value.get("metadata") or {}).get("generation"):
            priority = URGENT  # a user's edit of a model: ahead of the models that merely need a look
    for changed_key in changed:
        if isinstance(changed_key, tuple):
            runtime.queue.add(changed_key, priority)


async def sync(runtime: Runtime, namespaces: list[str]) -> None:
    """List every watched kind and bring the stores in line (see stores.py); the first call makes
    the view complete before any worker starts."""
    for kind in KINDS:
        started = time.monotonic()
        listed: dict[str, dict[str, tuple[Hashable | None, Any]]] = {}
        scopes: list[str | None] = list(namespaces) if kind.namespaced and namespaces else [None]
        for namespace in scopes:
            async for page in runtime.client.list_pages(kind.api_version, kind.plural, namespace, kind.label_selector):
                for body in page:  # slim copies only: a page of whole objects at a time
                    for store, id_, key, value in kind.entries(body):
                        listed.setdefault(store, {})[id_] = (key, value)
        dropped = 0
        for store in kind.stores:
            for id_, key, value, changed in runtime.indices[store].resync(listed.get(store, {}), started):
                dropped += key is None and bool(changed)
                _after_change(runtime, store, id_, key, value, changed, priority=BACKGROUND)
        if dropped and runtime.indices_ready.is_set():
            log.info("full listing of %s: %d dropped that the watches had missed the end of", kind.plural, dropped)


async def keep_in_sync(runtime: Runtime, namespaces: list[str]) -> None:
    """The first full listing, then one every `resyncSeconds`: objects deleted while a watch was
    gone (410 Gone, a restarted API server) are forgotten at the latest then."""
    while True:
        try:
            await sync(runtime, namespaces)
        except Exception:
            log.warning("listing the cluster failed; trying again", exc_info=True)
            await asyncio.sleep(5)
            continue
        # Every model is queued already: by kopf's event for it, or by the listing that added it.
        runtime.indices_ready.set()
        await asyncio.sleep(runtime.config.resync_seconds)


def build_registry(runtime: Runtime) -> kopf.OperatorRegistry:
    """The operator's kopf handlers: one event handler per watched kind."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # The watches connect as the write client does (k8s/connection.py): the same kubeconfig
        # or service account. kopf logs in again after a 401, which reads the credentials afresh.
        return connection_info(runtime.client.connection)

    for kind in KINDS:
        group, _, version = kind.api_version.rpartition("/")
        labels = MANAGED if kind.label_selector else None
        _register(registry, runtime, kind, group, version, labels)
    return registry


def connection_info(conn: ApiConnection) -> kopf.ConnectionInfo:
    creds = conn.credentials(fresh=True)
    return kopf.ConnectionInfo(
        server=conn.server, ca_data=conn.ca_pem, insecure=conn.insecure or None,
        scheme="Bearer" if creds.token else None, token=creds.token,
        certificate_data=creds.cert_pem, private_key_data=creds.key_pem,
        default_namespace=conn.namespace, expiration=creds.expires, proxy_url=conn.proxy)


def _register(registry: kopf.OperatorRegistry, runtime: Runtime, kind: Kind, group: str, version: str,
              labels: dict[str, str] | None) -> None:
    def on_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        # type None: an object of kopf's own listing (at start or after a 410), not a change.
        record(runtime, kind.entries(body), gone=type == "DELETED", priority=BACKGROUND if type is None else NORMAL)

    resource = (group, version, kind.plural) if group else (version, kind.plural)
    kopf.on.event(*resource, labels=labels, registry=registry)(on_event)


def _enqueue_unsettled(runtime: Runtime) -> None:
    """Models whose placement could change with the inventory: unplaced or not Ready."""
    for key, per_model in list(runtime.conditions.items()):
        if per_model.get("Degraded") == "True" or per_model.get("Ready") != "True":
            runtime.queue.add(key)
