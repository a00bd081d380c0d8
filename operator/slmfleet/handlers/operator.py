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

from slmfleet.api import modelrollout
from slmfleet.api.config import OperatorConfig
from slmfleet.api.conditions import Condition, set_condition
from slmfleet.api.smallmodel import GROUP, KIND, PLURAL, VERSION, SmallModel, SmallModelStatus
from slmfleet.builders import ModelOwner, served_model_name
from slmfleet.builders.labels import MANAGED_BY_LABEL, MODEL_LABEL, REVISION_LABEL
from slmfleet.builders.traffic import HTTPROUTE_API_VERSION
from slmfleet.evaluation.runner import Endpoint
from slmfleet.handlers import metrics
from slmfleet.handlers.evaluations import EvaluationOutcome, EvaluationRequest, Evaluations, LiveWatch, load_cases
from slmfleet.handlers.model_plan import LOADER_FAILURES, Observed, Plan, effective_body, plan_model
from slmfleet.handlers.rollout_plan import (
    RETRY_ANNOTATION,
    EvaluationSnapshot,
    RolloutObserved,
    parse_rollout,
    plan_not_governing,
)
from slmfleet.rollout.deprecations import DATA_KEY, Deprecations, DeprecationsError, parse_deprecations
from slmfleet.rollout.steps import evaluation_id
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
    workers_alive: int = 0
    last_progress: float = field(default_factory=time.monotonic)  # when a reconcile last finished
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
    evaluations: Evaluations | None = None
    live: LiveWatch = field(default_factory=LiveWatch)
    deprecations: Deprecations = Deprecations()
    gateway_api: tuple[bool, float] | None = None  # (served, when checked: monotonic)
    deprecations_ready: asyncio.Event = field(default_factory=asyncio.Event)
    eval_models: dict[str, ModelKey] = field(default_factory=dict)  # evaluation id -> its model

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


INDEX_NAMES = ("slm_models", "slm_deployments", "slm_services", "slm_model_pods", "slm_gpu_pods", "slm_nodes",
               "slm_rollouts")
MR_PLURAL = modelrollout.PLURAL
GATEWAY_RECHECK_SECONDS = 60.0
LIVE_CHECK_SECONDS = 10.0
DEPRECATIONS_POLL_SECONDS = 5.0


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
            "podIP": status.get("podIP"),
            "conditions": list(status.get("conditions") or []),
            # The weight loader's verdict lives here (exit code and termination message).
            "initContainerStatuses": [
                {"name": c.get("name"), "image": c.get("image"), "state": c.get("state") or {},
                 "lastState": c.get("lastState") or {}}
                for c in status.get("initContainerStatuses") or []
            ],
            # Only why a container waits (an image that cannot be pulled degrades the model).
            "containerStatuses": [
                {"name": c.get("name"), "image": c.get("image"),
                 "state": {"waiting": {"reason": waiting.get("reason")}} if (waiting := (c.get("state") or {}).get("waiting")) else {}}
                for c in status.get("containerStatuses") or []
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

    @kopf.index(GROUP, VERSION, MR_PLURAL, id="slm_rollouts", registry=registry)
    def slm_rollouts(body: kopf.Body, namespace: str, spec: kopf.Spec, **_: Any) -> dict[ModelKey, dict[str, Any]] | None:
        model = (spec.get("modelRef") or {}).get("name")
        return {(namespace, model): dict(body)} if model else None

    @kopf.on.event(GROUP, VERSION, MR_PLURAL, registry=registry)
    def rollout_event(namespace: str, spec: kopf.Spec, **kwargs: Any) -> None:
        runtime.capture(kwargs)
        if model := (spec.get("modelRef") or {}).get("name"):
            runtime.queue.add((namespace, model))

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


def rollouts_of(runtime: Runtime, key: ModelKey) -> list[dict[str, Any]]:
    """The ModelRollouts referencing the model, oldest first: the first governs it, others wait."""
    assert runtime.indices is not None
    cached = list(runtime.indices["slm_rollouts"].get(key, ()))
    rollouts = runtime.fresh(modelrollout.KIND, key[0], cached)
    rollouts = [r for r in rollouts if (r.get("spec", {}).get("modelRef") or {}).get("name") == key[1]]
    rollouts.sort(key=lambda r: (r["metadata"].get("creationTimestamp") or "", r["metadata"]["name"]))
    return rollouts


async def report_not_governing(runtime: Runtime, key: ModelKey, rollouts: list[dict[str, Any]],
                               model_exists: bool) -> None:
    """Say so in the status of rollouts that govern nothing, rather than leave them silent."""
    now = dt.datetime.now(dt.timezone.utc)
    for index, rollout in enumerate(rollouts):
        if not model_exists:
            reason, message = "ModelNotFound", f"SmallModel {key[0]}/{key[1]} does not exist"
        elif index > 0:
            reason, message = "Conflict", (f"SmallModel {key[1]} is governed by ModelRollout "
                                           f"{rollouts[0]['metadata']['name']} (the oldest referencing it)")
        else:
            continue
        status = plan_not_governing(rollout, reason, message, now)
        if status is not None:
            runtime.remember(rollout, await runtime.client.patch_status(_rollout_ref(rollout), status))
            metrics.API_WRITES.labels("status").inc()
            await runtime.client.post_event(_rollout_ref(rollout), "Warning", reason, message)


def attempt_prefix(rollout: dict[str, Any]) -> str:
    """Background evaluations belong to one attempt of one rollout: a retry starts afresh."""
    meta = rollout["metadata"]
    return f"{meta.get('uid', meta['name'])}/{(meta.get('annotations') or {}).get(RETRY_ANNOTATION, '')}/"


def evaluation_snapshots(runtime: Runtime, rollout: dict[str, Any]) -> dict[str, EvaluationSnapshot]:
    status = rollout.get("status") or {}
    candidate = status.get("candidateRevision")
    if not candidate or runtime.evaluations is None:
        return {}
    prefix = attempt_prefix(rollout)
    out = {}
    for step in range(len((rollout.get("spec") or {}).get("steps") or [])):
        eid = evaluation_id(candidate, step)
        if runtime.evaluations.running(prefix + eid):
            out[eid] = EvaluationSnapshot("running")
        elif (done := runtime.evaluations.outcome(prefix + eid)) is not None:
            age = time.monotonic() - done.finished_at
            out[eid] = EvaluationSnapshot(done.verdict, done.reason, done.result, may_retry=age >= 30.0)
    return out


def ready_pod_urls(runtime: Runtime, pods: tuple[dict[str, Any], ...], revision: str | None) -> list[str]:
    urls = []
    for pod in sorted(pods, key=lambda p: p["metadata"].get("name") or ""):
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if (pod["metadata"].get("labels") or {}).get(REVISION_LABEL) == revision and ready and status.get("podIP") \
                and pod["metadata"].get("deletionTimestamp") is None:
            urls.append(f"http://{status['podIP']}:{runtime.config.vllm_port}")
    return urls


def _served_name(body: dict[str, Any]) -> str:
    model = SmallModel.model_validate(body)
    meta = body["metadata"]
    return served_model_name(ModelOwner(meta["name"], meta["namespace"], meta.get("uid", "")), model.spec)


async def live_regression(runtime: Runtime, key: ModelKey, rollout: dict[str, Any], obs: Observed) -> str | None:
    """Whether the candidate's live traffic (scraped from its pods) breaches the thresholds, while
    it gets traffic. The world changes here without an event, so it is looked at again regularly."""
    status = rollout.get("status") or {}
    if int(status.get("canaryWeight") or 0) <= 0 or status.get("phase") not in ("Evaluating", "Progressing", "Paused"):
        return None
    parsed = parse_rollout(rollout)[0]
    candidate = status.get("candidateRevision")
    if parsed is None or not candidate:
        return None
    runtime.queue.add_after(key, LIVE_CHECK_SECONDS)
    urls = ready_pod_urls(runtime, obs.pods, candidate)
    if not urls:
        return None  # the step machine sees the candidate without ready replicas
    watch = f"{attempt_prefix(rollout)}{candidate}/step-{status.get('currentStep', 0)}"
    check = await runtime.live.check(watch, urls, _served_name(obs.body), parsed.spec.evaluation.thresholds)
    return check.reason if check.verdict == "fail" else None


async def gateway_api_served(runtime: Runtime) -> bool:
    """Whether the HTTPRoute CRD is installed (checked at most once a minute)."""
    if runtime.gateway_api is not None and time.monotonic() - runtime.gateway_api[1] < GATEWAY_RECHECK_SECONDS:
        return runtime.gateway_api[0]
    try:
        served = await runtime.client.serves(HTTPROUTE_API_VERSION, "httproutes")
    except Exception:  # noqa: BLE001 - discovery hiccup: keep the last answer
        log.warning("could not check whether the Gateway API is installed", exc_info=True)
        served = runtime.gateway_api[0] if runtime.gateway_api is not None else False
    runtime.gateway_api = (served, time.monotonic())
    return served


async def observe_rollout(runtime: Runtime, key: ModelKey, obs: Observed, rollout: dict[str, Any] | None) -> Observed:
    if rollout is None:
        return obs
    gateway = await gateway_api_served(runtime)
    ro = RolloutObserved(body=rollout, evaluations=evaluation_snapshots(runtime, rollout),
                         live_regression=await live_regression(runtime, key, rollout, obs), gateway_api=gateway)
    route = None
    if gateway and ((rollout.get("spec") or {}).get("traffic") or {}).get("httpRoute"):
        route = await runtime.client.get(HTTPROUTE_API_VERSION, "HTTPRoute", key[0], key[1])
    # Drop what earlier attempts or candidates of this rollout left behind.
    uid = f"{rollout['metadata'].get('uid', rollout['metadata']['name'])}/"
    current = attempt_prefix(rollout) + ((rollout.get("status") or {}).get("candidateRevision") or "")
    keep = lambda id_: not id_.startswith(uid) or id_.startswith(current)  # noqa: E731
    if runtime.evaluations is not None:
        runtime.evaluations.forget(keep)
    runtime.live.forget(keep)
    runtime.eval_models = {id_: model for id_, model in runtime.eval_models.items() if keep(id_)}
    return dataclasses.replace(obs, rollout=ro, route=route)


def _rollout_ref(rollout: dict[str, Any]) -> ObjectRef:
    meta = rollout["metadata"]
    return ObjectRef(f"{GROUP}/{VERSION}", modelrollout.KIND, meta["namespace"], meta["name"], meta.get("uid", ""))


async def execute(runtime: Runtime, obs: Observed, plan: Plan) -> None:
    meta = obs.body["metadata"]
    ref = ObjectRef(f"{GROUP}/{VERSION}", KIND, meta["namespace"], meta["name"], meta.get("uid", ""))
    rp = plan.rollout
    rollout = obs.rollout.body if obs.rollout is not None else None
    rollout_written = False
    if rp is not None and rollout is not None and rp.failed and rp.status is not None:
        # A rollback is recorded before its effect: a crash in between must not forget it.
        runtime.remember(rollout, await runtime.client.patch_status(_rollout_ref(rollout), rp.status))
        metrics.API_WRITES.labels("status").inc()
        rollout_written = True
    live = {(o["kind"], o["metadata"]["name"]): o for o in (*obs.deployments, *obs.services)}
    if obs.route is not None:
        live[("HTTPRoute", obs.route["metadata"]["name"])] = obs.route
    for obj in plan.apply:
        applied = await runtime.client.apply(obj)
        if obj["kind"] != "HTTPRoute":  # routes are read fresh, not cached
            runtime.remember(live.get((obj["kind"], obj["metadata"]["name"])), applied)
        metrics.API_WRITES.labels("apply").inc()
        log.info("applied %s %s/%s", obj["kind"], ref.namespace, obj["metadata"]["name"])
    # The status says which revision serves before the replaced one is deleted, so that nobody
    # reading the status sees a serving revision without its Deployment.
    if plan.status is not None:
        runtime.remember(obs.body, await runtime.client.patch_status(ref, plan.status))
        metrics.API_WRITES.labels("status").inc()
    for gone in plan.delete:
        await runtime.client.delete(ObjectRef(gone.api_version, gone.kind, ref.namespace, gone.name, gone.uid))
        runtime.deleted.add((gone.kind, ref.namespace, gone.name, gone.uid, ref.name))
        runtime.own_writes.pop((gone.kind, ref.namespace, gone.name), None)
        metrics.API_WRITES.labels("delete").inc()
        log.info("deleted %s %s/%s", gone.kind, ref.namespace, gone.name)
    if rp is not None and rollout is not None and rp.status is not None and not rollout_written:
        runtime.remember(rollout, await runtime.client.patch_status(_rollout_ref(rollout), rp.status))
        metrics.API_WRITES.labels("status").inc()
    for event in plan.events:
        if event.reason in WEIGHT_FAILURES:
            metrics.WEIGHT_VERIFICATION_FAILURES.labels(event.reason).inc()
        await runtime.client.post_event(ref, event.type, event.reason, event.message)
        metrics.API_WRITES.labels("event").inc()
        log.info("%s/%s %s: %s", ref.namespace, ref.name, event.reason, event.message)
    if rp is None or rollout is None:
        return
    rref = _rollout_ref(rollout)
    for event in rp.events:
        await runtime.client.post_event(rref, event.type, event.reason, event.message)
        metrics.API_WRITES.labels("event").inc()
        log.info("%s/%s %s: %s", rref.namespace, rref.name, event.reason, event.message)
    metrics.CANARY_WEIGHT.labels(rref.namespace, rref.name).set(rp.weight if rp.governed else 0)
    if rp.rollback_reason:
        metrics.ROLLBACKS.labels(rref.namespace, rref.name, rp.rollback_reason).inc()
    if rp.promoted and any(e.reason == "Promoted" for e in rp.events):
        metrics.PROMOTIONS.labels(rref.namespace, rref.name).inc()
    if rp.start is not None:
        start_evaluation(runtime, obs, plan, rollout)


def start_evaluation(runtime: Runtime, obs: Observed, plan: Plan, rollout: dict[str, Any]) -> None:
    """Ensure the evaluation the plan asks for runs (the same id twice is one evaluation)."""
    rp = plan.rollout
    assert rp is not None and rp.start is not None and rp.spec is not None and runtime.evaluations is not None
    status = plan.status or obs.body.get("status") or {}
    stable, candidate = status.get("servingRevision"), status.get("revision")
    stable_urls = ready_pod_urls(runtime, obs.pods, stable)
    candidate_urls = ready_pod_urls(runtime, obs.pods, candidate)
    key = (obs.body["metadata"]["namespace"], obs.body["metadata"]["name"])
    if not stable_urls or not candidate_urls:
        runtime.queue.add_after(key, 2.0)  # the pods' IPs are not in the cache yet
        return
    name = _served_name(obs.body)
    meta = rollout["metadata"]
    request = EvaluationRequest(
        id=attempt_prefix(rollout) + rp.start.evaluation_id, namespace=meta["namespace"], rollout=meta["name"],
        rollout_uid=meta.get("uid", ""), step=rp.start.step, evaluation=rp.spec.evaluation,
        sample_size=rp.start.sample_size or rp.spec.evaluation.sample_size,
        stable=Endpoint(stable_urls[0], name), candidate=Endpoint(candidate_urls[0], name),
        stable_revision=stable, candidate_revision=candidate)
    runtime.eval_models[request.id] = key
    runtime.evaluations.ensure(request)


def evaluation_done(runtime: Runtime, request: EvaluationRequest, outcome: EvaluationOutcome) -> None:
    """A background evaluation ended: record its scores in /metrics and look at the model again."""
    metrics.EVALUATION_VERDICTS.labels(request.namespace, request.rollout, outcome.verdict).inc()
    revisions = {"stable": request.stable_revision, "candidate": request.candidate_revision}
    for role, scores in outcome.scores.items():
        for scorer, value in scores.items():
            metrics.EVALUATION_SCORE.labels(request.namespace, request.rollout, role, revisions.get(role, ""),
                                            scorer).set(value)
    key = runtime.eval_models.get(request.id)
    if key is not None:
        runtime.queue.add(key)


async def reconcile(runtime: Runtime, key: ModelKey) -> None:
    assert runtime.indices is not None
    started = time.monotonic()
    obs = observe(runtime, key)
    rollouts = rollouts_of(runtime, key)
    if obs is None:  # deleted: owner references let the garbage collector remove what it owned
        runtime.conditions.pop(key, None)
        runtime.gpus.pop(key, None)
        metrics.publish_model_gauges(runtime.conditions, runtime.gpus)
        try:
            await report_not_governing(runtime, key, rollouts, model_exists=False)
        except Exception:  # noqa: BLE001 - a status note only; the next event tries again
            log.warning("could not report on the rollouts of %s/%s", *key, exc_info=True)
        return
    try:
        await report_not_governing(runtime, key, rollouts, model_exists=True)
        now = dt.datetime.now(dt.timezone.utc)
        obs = dataclasses.replace(obs, deprecations=runtime.deprecations)
        if runtime.weights is not None:
            # The weights of what is to be served: a deprecated base falls back to another digest.
            served = effective_body(obs.body, runtime.deprecations, now)
            obs = dataclasses.replace(obs, weights=await runtime.weights.facts(served))
        obs = await observe_rollout(runtime, key, obs, rollouts[0] if rollouts else None)
        plan = plan_model(obs, runtime.config, now)
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


async def watch_deprecations(runtime: Runtime) -> None:
    """Keep the deprecated base models list current. It is one object: a GET every few seconds
    needs only `get` on it, where a watch would need `list` on every ConfigMap. Models are not
    reconciled before the first read: a restarted operator must not roll a deprecated model forward."""
    ref = runtime.config.deprecations
    if ref is None:
        runtime.deprecations_ready.set()
        return
    last: str | None = None
    while True:
        try:
            text = (await runtime.client.read_config_map(ref.namespace, ref.name)).get(DATA_KEY, "")
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "status", None) == 404:
                text = ""
            else:
                log.warning("could not read the deprecations ConfigMap %s/%s: %s", ref.namespace, ref.name, exc)
                await asyncio.sleep(DEPRECATIONS_POLL_SECONDS)
                continue
        if text != last:
            try:
                runtime.deprecations = parse_deprecations(text)
                log.info("deprecated base models: %s",
                         ", ".join(d.base_model for d in runtime.deprecations.entries) or "none")
                if runtime.indices is not None:
                    for key in list(runtime.indices["slm_models"]):
                        runtime.queue.add(key)
            except DeprecationsError as exc:
                # Keep the last good list: a typo must not un-deprecate anything. Say so where the
                # platform team looks: `kubectl describe configmap` shows the Event.
                message = f"{exc}; the operator keeps the previous list"
                log.error("%s/%s: %s", ref.namespace, ref.name, message)
                try:
                    await runtime.client.post_event(ObjectRef("v1", "ConfigMap", ref.namespace, ref.name),
                                                    "Warning", "InvalidDeprecations", message)
                except Exception:  # noqa: BLE001 - the log has it
                    log.warning("could not post the InvalidDeprecations Event", exc_info=True)
            last = text
            runtime.deprecations_ready.set()
        await asyncio.sleep(DEPRECATIONS_POLL_SECONDS)


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
    """One of `config.workers`: the queue hands each model to one worker at a time."""
    await runtime.indices_ready.wait()
    await runtime.deprecations_ready.wait()
    runtime.workers_alive += 1
    try:
        while True:
            key = await runtime.queue.get()
            try:
                await reconcile(runtime, key)
            finally:
                runtime.queue.done(key)
                runtime.last_progress = time.monotonic()
    finally:
        runtime.workers_alive -= 1


def healthy(runtime: Runtime, watching: bool, now: float) -> bool:
    """/healthz: the watches are up, every worker runs, and work that is waiting gets done: no
    reconcile finishing for `workerStallSeconds` while keys wait means the workers hang, and the
    liveness probe should restart the operator."""
    if not watching or runtime.workers_alive < runtime.config.workers:
        return False
    return not runtime.queue.busy or now - runtime.last_progress < runtime.config.worker_stall_seconds


async def run(config: OperatorConfig, *, namespaces: list[str], kubeconfig: str | None, metrics_host: str,
              metrics_port: int, stop: asyncio.Event | None = None) -> None:
    runtime = Runtime(config=config, client=KubeClient(kubeconfig))
    runtime.weights = WeightsReader(runtime.client)
    runtime.evaluations = Evaluations(lambda request: load_cases(runtime.client, request),
                                      lambda request, outcome: evaluation_done(runtime, request, outcome))
    registry = build_registry(runtime)
    settings = kopf.OperatorSettings()
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per watch event otherwise
    settings.posting.enabled = False  # Events are ours to post, through slmfleet.k8s, never kopf's log lines
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # kopf's own calls (not the watches): a deadline, as for ours (k8s/client.py).
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    ready = asyncio.Event()
    kopf_stop = asyncio.Event()
    runner = await metrics.serve(metrics_host, metrics_port,
                                 lambda: healthy(runtime, ready.is_set(), time.monotonic()))
    tasks = [
        *(asyncio.create_task(worker(runtime), name=f"slmfleet-worker-{n}") for n in range(config.workers)),
        asyncio.create_task(runtime.queue.run_timers(), name="slmfleet-timers"),
        asyncio.create_task(watch_deprecations(runtime), name="slmfleet-deprecations"),
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
        await runtime.evaluations.close()
        runtime.client.close()
