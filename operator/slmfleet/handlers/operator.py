"""The kopf wiring: watch-fed indices, thin event handlers, and the reconcile worker.

kopf's regular change handlers keep progress in annotations and finalizers, which are writes on
objects we want to leave alone. We only use what writes nothing: indices (in-memory caches fed by
watches; kopf calls no handler before every index has its initial listing, so a restarted
operator never decides from a half-empty view) and event handlers that turn watch events into
queued model keys. A single worker takes keys from the queue, plans (model_plan.py) and acts
through slmfleet.k8s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from slmfleet.api.config import OperatorConfig
from slmfleet.api.conditions import Condition, set_condition
from slmfleet.api.smallmodel import GROUP, KIND, PLURAL, VERSION, SmallModelStatus
from slmfleet.builders.labels import MANAGED_BY_LABEL, MODEL_LABEL
from slmfleet.handlers import metrics
from slmfleet.handlers.model_plan import LOADER_FAILURES, Observed, Plan, plan_model
from slmfleet.handlers.weights_reader import WeightsReader
from slmfleet.handlers.workqueue import WorkQueue
from slmfleet.k8s.client import KubeClient, ObjectRef

log = logging.getLogger("slmfleet.operator")

ModelKey = tuple[str, str]  # (namespace, name)
MANAGED = {MANAGED_BY_LABEL: "slmfleet"}
GPU_PREFIX = "nvidia.com/"
RETRY_SECONDS = (1, 2, 5, 10, 30, 60)
REPORT_AFTER_FAILURES = 3
# Verdicts against the pinned weights, from the operator's own read or a pod's loader.
WEIGHT_FAILURES = frozenset({*LOADER_FAILURES.values(), "ManifestInvalid", "ManifestMissing"})


@dataclass
class Runtime:
    """What the handlers and the worker share (kopf passes it around as the operator's memo)."""

    config: OperatorConfig
    client: KubeClient
    queue: WorkQueue = field(default_factory=WorkQueue)
    indices: dict[str, Any] | None = None
    indices_ready: asyncio.Event = field(default_factory=asyncio.Event)
    failures: dict[ModelKey, int] = field(default_factory=dict)
    conditions: dict[ModelKey, dict[str, str]] = field(default_factory=dict)
    gpus: dict[ModelKey, dict[str, int]] = field(default_factory=dict)
    worker_alive: bool = False
    weights: WeightsReader | None = None
    nodes_seen: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # name -> last sizing view
    # Our own writes, until the watch brings them back: (kind, namespace, name) ->
    # (resourceVersion the cache had before the write, the object the API server returned).
    # Without it, a reconcile that runs before the watch catches up would decide from the past.
    # The older versions are all those we saw before our writes: two writes may come before the
    # watch delivers the first.
    own_writes: dict[tuple[str, str, str], tuple[frozenset[str | None], dict[str, Any]]] = field(default_factory=dict)
    # Objects we deleted, until the cache drops them: (kind, namespace, name, uid, owning model).
    deleted: set[tuple[str, str, str, str, str]] = field(default_factory=set)

    def remember(self, before: dict[str, Any] | None, after: dict[str, Any]) -> None:
        meta = after["metadata"]
        key = (after["kind"], meta["namespace"], meta["name"])
        older = {(before or {}).get("metadata", {}).get("resourceVersion")}
        if key in self.own_writes:
            previous_older, previous = self.own_writes[key]
            older |= previous_older | {previous["metadata"].get("resourceVersion")}
        self.own_writes[key] = (frozenset(older), after)

    def fresh(self, kind: str, namespace: str, cached: list[dict[str, Any]], owner: str = "") -> list[dict[str, Any]]:
        """`cached` objects of `kind` owned by model `owner`, with our newer writes in place of what
        the cache still lacks, and without what we deleted."""
        out = []
        seen = set()
        still_cached = set()
        for obj in cached:
            name = obj["metadata"]["name"]
            gone = (kind, namespace, name, obj["metadata"].get("uid", ""), owner)
            if gone in self.deleted:
                still_cached.add(gone)
                continue
            seen.add(name)
            write = self.own_writes.get((kind, namespace, name))
            if write and obj["metadata"].get("resourceVersion") in write[0]:
                out.append(write[1])
            else:
                self.own_writes.pop((kind, namespace, name), None)
                out.append(obj)
        self.deleted -= {d for d in self.deleted if d[:2] == (kind, namespace) and d[4] == owner} - still_cached
        for (k, ns, name), (older, obj) in list(self.own_writes.items()):
            if k != kind or ns != namespace or name in seen or None not in older:
                continue
            if owner and (obj["metadata"].get("labels") or {}).get(MODEL_LABEL, obj["metadata"]["name"]) != owner:
                continue
            out.append(obj)
        return out

    def capture(self, kwargs: dict[str, Any]) -> None:
        if self.indices is None:
            self.indices = {name: kwargs[name] for name in INDEX_NAMES}
            self.indices_ready.set()


INDEX_NAMES = ("slm_models", "slm_deployments", "slm_services", "slm_model_pods", "slm_gpu_pods", "slm_nodes")


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
    containers = lambda items: [{"name": c.get("name"), "resources": c.get("resources") or {}} for c in items or []]
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("slmfleet.io/")},
            "creationTimestamp": meta.get("creationTimestamp"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {
            "nodeName": spec.get("nodeName"),
            "containers": containers(spec.get("containers")),
            "initContainers": containers(spec.get("initContainers")),
        },
        "status": {
            "phase": status.get("phase"),
            "conditions": list(status.get("conditions") or []),
            # The weight loader's verdict lives here (exit code and termination message).
            "initContainerStatuses": [
                {"name": c.get("name"), "state": c.get("state") or {}, "lastState": c.get("lastState") or {}}
                for c in status.get("initContainerStatuses") or []
            ],
        },
    }


def build_registry(runtime: Runtime) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A plain registry has no fallback logins; use the kubeconfig / in-cluster config as the
        # write client does.
        return kopf.login_via_client(**kwargs)

    # Indices: the operator's view of the world.
    @kopf.index(GROUP, VERSION, PLURAL, id="slm_models", registry=registry)
    def slm_models(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[ModelKey, dict[str, Any]]:
        return {(namespace, name): dict(body)}

    def by_model(body: kopf.Body, namespace: str, labels: kopf.Labels) -> dict[ModelKey, dict[str, Any]] | None:
        model = labels.get(MODEL_LABEL)
        return {(namespace, model): dict(body)} if model else None

    @kopf.index("apps", "v1", "deployments", labels=MANAGED, id="slm_deployments", registry=registry)
    def slm_deployments(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[ModelKey, dict[str, Any]] | None:
        return by_model(body, namespace, labels)

    @kopf.index("v1", "services", labels=MANAGED, id="slm_services", registry=registry)
    def slm_services(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[ModelKey, dict[str, Any]] | None:
        return by_model(body, namespace, labels)

    @kopf.index("v1", "pods", labels={MODEL_LABEL: kopf.PRESENT}, id="slm_model_pods", registry=registry)
    def slm_model_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[ModelKey, dict[str, Any]]:
        return {(namespace, labels[MODEL_LABEL]): _slim_pod(body)}

    @kopf.index("v1", "pods", id="slm_gpu_pods", registry=registry)
    def slm_gpu_pods(body: kopf.Body, spec: kopf.Spec, **_: Any) -> dict[str, dict[str, Any]] | None:
        phase = body.get("status", {}).get("phase")
        if phase in ("Succeeded", "Failed") or not _requests_gpu(dict(spec)):
            return None
        return {"all": _slim_pod(body)}

    @kopf.index("v1", "nodes", id="slm_nodes", registry=registry)
    def slm_nodes(body: kopf.Body, name: str, **_: Any) -> dict[str, dict[str, Any]]:
        return {"all": _slim_node(body, name)}

    # Events: which model to look at again.
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
    def model_pod_event(type: str | None, namespace: str, labels: kopf.Labels, spec: kopf.Spec, status: kopf.Status,
                        **kwargs: Any) -> None:
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

    return registry


def _enqueue_unsettled(runtime: Runtime) -> None:
    """Models whose placement could change with the inventory: unplaced or not Ready."""
    if runtime.indices is None:
        return
    for key, per_model in list(runtime.conditions.items()):
        if per_model.get("Degraded") == "True" or per_model.get("Ready") != "True":
            runtime.queue.add(key)


def observe(runtime: Runtime, key: ModelKey) -> Observed | None:
    indices = runtime.indices
    assert indices is not None
    models = list(indices["slm_models"].get(key, ()))
    if not models:
        return None
    body = runtime.fresh(KIND, key[0], models, key[1])[0]
    return Observed(
        body=body,
        deployments=tuple(runtime.fresh("Deployment", key[0], list(indices["slm_deployments"].get(key, ())), key[1])),
        services=tuple(runtime.fresh("Service", key[0], list(indices["slm_services"].get(key, ())), key[1])),
        pods=tuple(indices["slm_model_pods"].get(key, ())),
        nodes=tuple(indices["slm_nodes"].get("all", ())),
        gpu_pods=tuple(indices["slm_gpu_pods"].get("all", ())),
    )


async def execute(runtime: Runtime, obs: Observed, plan: Plan) -> None:
    meta = obs.body["metadata"]
    ref = ObjectRef(f"{GROUP}/{VERSION}", KIND, meta["namespace"], meta["name"], meta.get("uid", ""))
    live = {(o["kind"], o["metadata"]["name"]): o for o in (*obs.deployments, *obs.services)}
    for obj in plan.apply:
        runtime.remember(live.get((obj["kind"], obj["metadata"]["name"])), await runtime.client.apply(obj))
        metrics.API_WRITES.labels("apply").inc()
        log.info("applied %s %s/%s", obj["kind"], ref.namespace, obj["metadata"]["name"])
    for gone in plan.delete:
        await runtime.client.delete(ObjectRef(gone.api_version, gone.kind, ref.namespace, gone.name, gone.uid))
        runtime.deleted.add((gone.kind, ref.namespace, gone.name, gone.uid, ref.name))
        runtime.own_writes.pop((gone.kind, ref.namespace, gone.name), None)
        metrics.API_WRITES.labels("delete").inc()
        log.info("deleted %s %s/%s", gone.kind, ref.namespace, gone.name)
    if plan.status is not None:
        runtime.remember(obs.body, await runtime.client.patch_status(ref, plan.status))
        metrics.API_WRITES.labels("status").inc()
    for event in plan.events:
        if event.reason in WEIGHT_FAILURES:
            metrics.WEIGHT_VERIFICATION_FAILURES.labels(event.reason).inc()
        await runtime.client.post_event(ref, event.type, event.reason, event.message)
        metrics.API_WRITES.labels("event").inc()
        log.info("%s/%s %s: %s", ref.namespace, ref.name, event.reason, event.message)


async def reconcile(runtime: Runtime, key: ModelKey) -> None:
    assert runtime.indices is not None
    started = time.monotonic()
    obs = observe(runtime, key)
    if obs is None:  # deleted: owner references let the garbage collector remove what it owned
        runtime.conditions.pop(key, None)
        runtime.gpus.pop(key, None)
        metrics.publish_model_gauges(runtime.conditions, runtime.gpus)
        return
    try:
        if runtime.weights is not None:
            obs = dataclasses.replace(obs, weights=await runtime.weights.facts(obs.body))
        plan = plan_model(obs, runtime.config, dt.datetime.now(dt.timezone.utc))
        await execute(runtime, obs, plan)
    except Exception:
        attempt = runtime.failures.get(key, 0)
        runtime.failures[key] = attempt + 1
        delay = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
        log.exception("reconcile of %s/%s failed (attempt %d); retrying in %ss", *key, attempt + 1, delay)
        metrics.RECONCILES.labels(KIND, "error").inc()
        runtime.queue.add_after(key, delay)
        if attempt + 1 == REPORT_AFTER_FAILURES:
            await _report_failure(runtime, obs.body, sys.exc_info()[1])
        return
    finally:
        metrics.RECONCILE_SECONDS.labels(KIND).observe(time.monotonic() - started)
    runtime.failures.pop(key, None)
    runtime.conditions[key] = plan.conditions
    runtime.gpus[key] = plan.gpus
    metrics.publish_model_gauges(runtime.conditions, runtime.gpus)
    metrics.RECONCILES.labels(KIND, "changed" if plan.writes else "noop").inc()
    if plan.requeue_after is not None:
        runtime.queue.add_after(key, plan.requeue_after)


async def _report_failure(runtime: Runtime, body: dict[str, Any], exc: BaseException | None) -> None:
    """Say in the status that reconciling keeps failing, rather than failing silently in a log."""
    meta = body["metadata"]
    old = SmallModelStatus.model_validate(body.get("status") or {})
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    message = f"reconciling keeps failing ({type(exc).__name__}: {exc}); the operator retries with back-off"
    cond = Condition(type="Degraded", status="True", reason="ReconcileError", message=message[:1000],
                     observed_generation=meta.get("generation"))
    status = old.model_copy(update={"conditions": set_condition(old.conditions, cond, now)}).to_wire()
    ref = ObjectRef(f"{GROUP}/{VERSION}", KIND, meta["namespace"], meta["name"], meta.get("uid", ""))
    try:
        await runtime.client.patch_status(ref, status)
        await runtime.client.post_event(ref, "Warning", "ReconcileError", message)
    except Exception:  # noqa: BLE001 - the log already has the original failure
        log.warning("could not report the failure in %s/%s's status", ref.namespace, ref.name)


async def worker(runtime: Runtime) -> None:
    await runtime.indices_ready.wait()
    runtime.worker_alive = True
    try:
        while True:
            key = await runtime.queue.get()
            await reconcile(runtime, key)
    finally:
        runtime.worker_alive = False


async def run(config: OperatorConfig, *, namespaces: list[str], kubeconfig: str | None, metrics_host: str,
              metrics_port: int, stop: asyncio.Event | None = None) -> None:
    runtime = Runtime(config=config, client=KubeClient(kubeconfig))
    runtime.weights = WeightsReader(runtime.client)
    registry = build_registry(runtime)
    settings = kopf.OperatorSettings()
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per watch event otherwise
    settings.posting.enabled = False  # Events are ours to post, through slmfleet.k8s, never kopf's log lines
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    ready = asyncio.Event()
    kopf_stop = asyncio.Event()
    runner = await metrics.serve(metrics_host, metrics_port, lambda: ready.is_set() and runtime.worker_alive)
    tasks = [
        asyncio.create_task(worker(runtime), name="slmfleet-worker"),
        asyncio.create_task(runtime.queue.run_timers(), name="slmfleet-timers"),
        asyncio.create_task(
            kopf.operator(
                registry=registry,
                settings=settings,
                standalone=True,
                clusterwide=not namespaces,
                namespaces=namespaces,
                ready_flag=ready,
                stop_flag=kopf_stop,
            ),
            name="kopf",
        ),
    ]
    waiters = list(tasks)
    if stop is not None:
        waiters.append(asyncio.create_task(stop.wait(), name="stop"))
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.get_name() != "stop" and task.exception():
                raise task.exception()  # type: ignore[misc]
    finally:
        kopf_stop.set()
        for task in waiters:
            if task.get_name() != "kopf":
                task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await runner.cleanup()
        runtime.client.close()
