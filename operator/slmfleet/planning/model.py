"""Decide what a SmallModel needs, as data: the plan half of plan-then-act.

`plan_model` takes everything observed about one SmallModel (its body, what it owns, the nodes and
GPU pods) plus the clock, and returns the objects to apply, the objects to delete, the status to
write and the Events to post. It does no I/O, so every decision is unit-tested without a cluster;
`reconcile.py` executes the plan. Level-based: the same observation always gives the same plan, and
a world that already matches gives an empty one (no writes).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from slmfleet import sizing
from slmfleet.api.conditions import Condition, find, set_condition
from slmfleet.api.config import OperatorConfig
from slmfleet.api.smallmodel import (
    MAX_HISTORY,
    ExcludedPlacement,
    FallbackPlacement,
    MemoryBreakdown,
    Placement,
    RevisionRecord,
    SmallModel,
    SmallModelStatus,
)
from slmfleet.builders import (
    ModelOwner,
    UnsupportedSource,
    build_deployment,
    build_model_service,
    build_revision_service,
    model_endpoint,
    revision_of,
)
from slmfleet.builders.applied_hash import APPLIED_HASH, with_applied_hash
from slmfleet.builders.labels import PLACEMENT_ANNOTATION, REVISION_LABEL
from slmfleet.builders.traffic import build_http_route
from slmfleet.builders.weights import LOADER_CONTAINER
from slmfleet.planning.rollout import EventNote, RolloutObserved, RolloutPlan, plan_rollout
from slmfleet.rollout.deprecations import Deprecations, HistoryEntry, last_known_good
from slmfleet.weights import errors
from slmfleet.weights.facts import WeightsFacts

GIB = 1024**3


@dataclass(frozen=True)
class Observed:
    """One SmallModel and the slice of the world it depends on, as plain API dicts."""

    body: dict[str, Any]
    deployments: tuple[dict[str, Any], ...] = ()  # owned by this model
    services: tuple[dict[str, Any], ...] = ()  # owned by this model
    pods: tuple[dict[str, Any], ...] = ()  # this model's pods
    nodes: tuple[dict[str, Any], ...] = ()
    gpu_pods: tuple[dict[str, Any], ...] = ()  # every pod in the cluster that requests GPUs
    weights: WeightsFacts | None = None  # read from the source before any pod (S3 sources)
    rollout: RolloutObserved | None = None  # the ModelRollout governing this model, if any
    route: dict[str, Any] | None = None  # the model's live HTTPRoute (HTTPRoute traffic only)
    deprecations: Deprecations = Deprecations()


GOOD_OUTCOMES = ("Serving", "Replaced", "Promoted")


@dataclass(frozen=True)
class Deletion:
    api_version: str
    kind: str
    name: str
    uid: str


@dataclass(frozen=True)
class Plan:
    apply: tuple[dict[str, Any], ...] = ()
    delete: tuple[Deletion, ...] = ()
    status: dict[str, Any] | None = None  # None: the status already says this
    events: tuple[EventNote, ...] = ()
    requeue_after: float | None = None  # seconds; for changes that come without a watch event
    gpus: dict[str, int] = field(default_factory=dict)  # product -> GPUs this model requests (metrics)
    conditions: dict[str, str] = field(default_factory=dict)  # type -> status (metrics)
    rollout: RolloutPlan | None = None  # the governing ModelRollout's status, Events, evaluation to start

    @property
    def writes(self) -> int:
        own = len(self.apply) + len(self.delete) + (self.status is not None) + len(self.events)
        return own + (0 if self.rollout is None else (self.rollout.status is not None) + len(self.rollout.events))


def _rfc3339(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def _gib(n: int | float) -> str:
    return f"{n / GIB:.1f}"


def to_api_placement(chosen: sizing.Placement, profile: sizing.MemoryProfile, reasons: Iterable[str]) -> Placement:
    return Placement(
        gpu_resource=chosen.gpu_resource,
        gpu_product=chosen.gpu_product,
        gpu_count=chosen.gpu_count,
        tensor_parallel_size=chosen.tensor_parallel_size,
        gpu_memory_utilization=f"{chosen.gpu_memory_utilization:.2f}",
        max_model_len=chosen.max_model_len,
        max_num_seqs=chosen.max_num_seqs,
        max_num_batched_tokens=chosen.max_num_batched_tokens,
        device_memory_bytes=chosen.device_memory_bytes,
        node_selector=dict(chosen.node_selector),
        memory=MemoryBreakdown(
            weights_bytes=profile.weights_bytes,
            kv_bytes_per_token=profile.kv_bytes_per_token,
            kv_cache_bytes=profile.kv_cache_bytes,
            overhead_bytes=profile.overhead_bytes,
            total_bytes=profile.total_bytes,
        ),
        summary=f"{chosen.gpu_product} x{chosen.gpu_count}",
        reasons=list(reasons),
    )


def _fallback(p: sizing.Placement) -> FallbackPlacement:
    return FallbackPlacement(
        gpu_resource=p.gpu_resource, gpu_product=p.gpu_product, gpu_count=p.gpu_count, max_model_len=p.max_model_len
    )


def hf_config(model: SmallModel, weights: WeightsFacts | None) -> dict[str, Any] | None:
    """config.json as the weights have it, with the facts declared in the spec taking precedence."""
    declared = model.spec.architecture.to_hf_config() if model.spec.architecture else None
    # A deep copy: the facts are cached and shared by every model with the same weights.
    read = copy.deepcopy(dict(weights.config)) if weights is not None and weights.config is not None else None
    if read is None:
        return declared
    if declared:
        declared.pop("architectures", None)
        text = read.get("text_config") if isinstance(read.get("text_config"), dict) else None
        (text if text is not None else read).update(declared)
    return read


def sizing_request(model: SmallModel, excluded: Iterable[str], weights: WeightsFacts | None = None) -> sizing.SizingRequest:
    spec = model.spec
    config = hf_config(model, weights)
    assert config is not None
    return sizing.SizingRequest(
        architecture=sizing.ModelArchitecture.from_hf_config(config),
        exact_weights_bytes=weights.weights_bytes if weights is not None else None,
        dtype=spec.serving.dtype,
        quantization=spec.serving.quantization,
        kv_cache_dtype=spec.serving.kv_cache_dtype,
        max_model_len=spec.serving.max_model_len,
        concurrency=spec.serving.concurrency,
        allowed_products=tuple(spec.resources.gpu_products),
        gpu_count=spec.resources.gpu_count,
        allow_mig=spec.resources.allow_mig,
        max_gpu_memory_utilization=spec.resources.max_gpu_memory_utilization,
        node_selector=dict(spec.resources.node_selector),
        excluded=frozenset(excluded),
    )


def sizing_inputs(model: SmallModel) -> str:
    """A hash of everything sizing reads from the spec (not replicas, names or extra flags)."""
    spec = model.spec
    serving = spec.serving.model_dump(exclude={"replicas", "served_model_name", "extra_args"})
    facts = {
        "architecture": spec.architecture.model_dump() if spec.architecture else None,
        "serving": serving,
        "resources": spec.resources.model_dump(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:10]


def _still_fits(placement: Placement, inventory: sizing.Inventory) -> bool:
    """Whether some node still has the placement's devices free (this model's own pods not counted)."""
    return any(
        n.device.resource == placement.gpu_resource
        and n.device.product == placement.gpu_product
        and n.free >= placement.gpu_count
        for n in inventory.nodes
    )


def _pending_since(pods: Iterable[dict[str, Any]], revision: str, placement: Placement) -> tuple[dt.datetime, str] | None:
    """When the oldest unschedulable pod of the revision and placement became unschedulable, and why."""
    oldest: tuple[dt.datetime, str] | None = None
    for pod in pods:
        meta = pod.get("metadata", {})
        if (meta.get("labels") or {}).get(REVISION_LABEL) != revision:
            continue
        if (meta.get("annotations") or {}).get(PLACEMENT_ANNOTATION) != placement.key:
            continue
        if (pod.get("status") or {}).get("phase") != "Pending" or (pod.get("spec") or {}).get("nodeName"):
            continue
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                if "PersistentVolumeClaim" in (cond.get("message") or ""):
                    continue  # a claim not bound yet: another GPU would not help
                since = _parse_time(cond.get("lastTransitionTime")) or _parse_time(meta.get("creationTimestamp"))
                if since and (oldest is None or since < oldest[0]):
                    oldest = (since, cond.get("message") or cond.get("reason") or "Unschedulable")
    return oldest


# `slmfleet load` exit codes (weights/loader.py) -> WeightsVerified reasons.
LOADER_FAILURES = {
    errors.EXIT_DIGEST_MISMATCH: "DigestMismatch",
    errors.EXIT_FILE_MISMATCH: "FileMismatch",
    errors.EXIT_REFUSED_FORMAT: "PickleRefused",
    errors.EXIT_UNREACHABLE: "StorageUnreachable",
    errors.EXIT_SOURCE_ERROR: "StorageDenied",
}


def weights_verified(pods: Iterable[dict[str, Any]], revision: str) -> tuple[str, str, str]:
    """WeightsVerified from the loader init containers of the revision's pods: a failure anywhere
    is news (a file changed under the pin), otherwise one success is enough."""
    success = None
    for pod in sorted(pods, key=lambda p: p["metadata"].get("name", "")):
        if (pod["metadata"].get("labels") or {}).get(REVISION_LABEL) != revision:
            continue
        for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if status.get("name") != LOADER_CONTAINER:
                continue
            current = (status.get("state") or {}).get("terminated")
            states = [status.get("state") or {}]
            if not (current and int(current.get("exitCode", 1)) == 0):
                states.append(status.get("lastState") or {})  # an earlier failure, not yet retried well
            for state in states:
                done = state.get("terminated")
                if not done:
                    continue
                code = int(done.get("exitCode", 0))
                if code == 0:
                    success = success or f"pod {pod['metadata'].get('name')} loaded and verified every file of the manifest"
                else:
                    reason = LOADER_FAILURES.get(code, "LoadFailed")
                    message = (done.get("message") or "").strip() or f"the loader exited with {code}"
                    return "False", reason, f"pod {pod['metadata'].get('name')}: {message}"[:2000]
    if success:
        return "True", "Verified", success
    return "Unknown", "Pending", "no loader has finished yet"


# The kubelet's waiting reasons for an image it cannot get: another node would not help.
IMAGE_PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName")


def image_pull_failure(pods: Iterable[dict[str, Any]], revision: str) -> str | None:
    """Which image the revision's pods cannot pull, if any. The image is the operator's own
    setting (vllmImage, loaderImage), so naming it leaks nothing of a tenant's; the registry's
    own error text stays in the pod's status."""
    for pod in sorted(pods, key=lambda p: p["metadata"].get("name", "")):
        if (pod["metadata"].get("labels") or {}).get(REVISION_LABEL) != revision:
            continue
        status = pod.get("status") or {}
        for c in (*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])):
            reason = ((c.get("state") or {}).get("waiting") or {}).get("reason")
            if reason in IMAGE_PULL_FAILURES:
                return (f"pod {pod['metadata'].get('name')}: container {c.get('name')} cannot pull image "
                        f"{c.get('image')} ({reason}); check that the registry has it by digest and the pull secrets")[:1000]
    return None


def keep_loader_image(desired: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any]:
    """The revision's Deployment with the loader image its live version already has. The loader
    runs once, when a pod starts, and its image is the operator's own: upgrading the operator must
    not restart every serving model to swap a loader that has finished. New revisions (and a
    revision's first Deployment) get the configured loader."""
    if live is None:
        return desired
    running = {c.get("name"): c.get("image")
               for c in (((live.get("spec") or {}).get("template") or {}).get("spec") or {}).get("initContainers") or []}
    for c in desired["spec"]["template"]["spec"].get("initContainers") or []:
        if c["name"] == LOADER_CONTAINER and running.get(LOADER_CONTAINER):
            c["image"] = running[LOADER_CONTAINER]
    return desired


def _deployment_ready(dep: dict[str, Any] | None, desired: dict[str, Any] | None) -> bool:
    """The Deployment runs exactly the desired template and all its replicas are ready."""
    if dep is None:
        return False
    meta, spec, status = dep.get("metadata", {}), dep.get("spec", {}), dep.get("status") or {}
    if desired is not None and (meta.get("annotations") or {}).get(APPLIED_HASH) != (
        desired["metadata"]["annotations"][APPLIED_HASH]
    ):
        return False
    if status.get("observedGeneration", 0) < meta.get("generation", 0):
        return False
    replicas = spec.get("replicas", 1)
    return bool(
        status.get("updatedReplicas", 0) >= replicas
        and status.get("readyReplicas", 0) >= replicas
        and status.get("replicas", 0) == replicas
    )


def _revision_of_object(obj: dict[str, Any]) -> str | None:
    return (obj.get("metadata", {}).get("labels") or {}).get(REVISION_LABEL)


def retirement_grace(history: Iterable[RevisionRecord], delay_seconds: int | None,
                     now: dt.datetime) -> dict[str, dt.datetime]:
    """Revisions replaced under a ModelRollout whose grace period (its scaleDownDelaySeconds from
    when their successor started serving) is still running: revision -> when it ends. The history
    is the clock, not the rollout that replaced them: a rollout that starts during the grace period
    must not keep them for good."""
    if not delay_seconds:
        return {}
    records = list(history)
    grace: dict[str, dt.datetime] = {}
    for i, record in enumerate(records):
        if record.outcome == "RolledBack":
            continue  # it never served
        # Replaced by a promotion (a promoted revision too, when a later rollout promotes another):
        # the grace period is for going back. A revision replaced by a deprecation's fallback goes.
        successor = next((h for h in records[i + 1:] if h.outcome != "RolledBack"), None)
        if successor is None or successor.outcome != "Promoted":
            continue
        since = _parse_time(successor.since)
        if since is not None and now < (ends := since + dt.timedelta(seconds=delay_seconds)):
            grace[record.revision] = ends
    return grace


def retired_events(delete: Iterable[Deletion], serving: str | None) -> list[EventNote]:
    """The Event for the revisions a plan retires (by their Deployments), if any."""
    names = sorted({d.name for d in delete if d.kind == "Deployment"})
    if not names:
        return []
    who = f"revision {serving} serves" if serving else "no revision serves"
    return [EventNote("Normal", "RevisionRetired", f"{who}; removed {', '.join(names)}")]


def retirements(objects: Iterable[dict[str, Any]], keep: set[str | None], grace: dict[str, dt.datetime],
                now: dt.datetime) -> tuple[list[Deletion], float | None]:
    """The Deployments and Services of revisions that are neither kept nor in their grace period,
    and when to look again for those that are."""
    delete: list[Deletion] = []
    requeue: float | None = None
    for obj in objects:
        obj_revision = _revision_of_object(obj)
        if obj_revision is None or obj_revision in keep or obj["metadata"].get("deletionTimestamp") is not None:
            continue
        if obj_revision in grace:
            requeue = _sooner(requeue, (grace[obj_revision] - now).total_seconds() + 0.5)
            continue
        delete.append(Deletion(obj["apiVersion"], obj["kind"], obj["metadata"]["name"], obj["metadata"].get("uid", "")))
    return delete, requeue


class _Status:
    """Builds the next status from the previous one, moving transition times only on change."""

    def __init__(self, old: SmallModelStatus, generation: int, now: dt.datetime) -> None:
        self.old = old
        self.generation = generation
        self.now = _rfc3339(now)
        self.conditions = list(old.conditions)

    def condition(self, type_: str, status: bool | str, reason: str, message: str) -> None:
        new = Condition(
            type=type_,
            status=status if isinstance(status, str) else ("True" if status else "False"),
            reason=reason,
            message=message,
            observed_generation=self.generation,
        )
        self.conditions = set_condition(self.conditions, new, self.now)


def _changed_condition_events(old: list[Condition], new: list[Condition]) -> list[EventNote]:
    """An Event for every condition that turned bad or good, or changed its reason."""
    events = []
    degraded = find(new, "Degraded")
    for cond in new:
        before = find(old, cond.type)
        if before is not None and (before.status, before.reason) == (cond.status, cond.reason):
            continue
        if cond.type == "Degraded" and cond.status == "True":
            events.append(EventNote("Warning", cond.reason, cond.message))
        elif cond.type == "WeightsVerified" and cond.status == "False":
            if degraded is None or (degraded.status, degraded.reason) != ("True", cond.reason):
                events.append(EventNote("Warning", cond.reason, cond.message))
        elif cond.type == "WeightsVerified" and cond.status == "True":
            events.append(EventNote("Normal", "WeightsVerified", cond.message))
        elif cond.type == "Ready" and cond.status == "True":
            events.append(EventNote("Normal", "Ready", cond.message))
    return events


@dataclass(frozen=True)
class Deprecated:
    """The model's base is deprecated: what it serves instead, and what to say."""

    message: str
    target: RevisionRecord | None  # the revision to serve instead; None: nothing to fall back to


def deprecated_base(model: SmallModel, deprecations: Deprecations, now: dt.datetime) -> Deprecated | None:
    """Whether spec.baseModel is deprecated, and if so the newest revision in the history whose base
    is not and which passed (it was promoted, or it was the stable revision); failing that, the
    revision serving now, which keeps serving. The operator never edits the spec: it serves the
    fallback's digest with the spec's other settings, and says so in the status."""
    deprecation = deprecations.lookup(model.spec.base_model, now)
    if deprecation is None:
        return None
    history = [h for h in model.status.history if h.uri]
    entries = [HistoryEntry(h.revision, h.digest, h.base_model, "Serving" if h.outcome in GOOD_OUTCOMES else h.outcome)
               for h in history]
    good = last_known_good(entries, deprecations, now)
    why = f"base model {deprecation.base_model} is deprecated ({deprecation.reason})"
    if good is not None:
        target = next(h for h in reversed(history) if h.revision == good.revision)
        return Deprecated(f"{why}: serving the last known good revision {target.revision} (digest {target.digest}, "
                          f"base {target.base_model or 'unknown'}); fix spec.source and spec.baseModel to end this", target)
    serving = next((h for h in reversed(history) if h.revision == model.status.serving_revision), None)
    if serving is not None:
        return Deprecated(f"{why}, and no earlier revision with a base that is not deprecated passed: revision "
                          f"{serving.revision} keeps serving", serving)
    return Deprecated(f"{why}: it is not deployed", None)


def _serve_record(model: SmallModel, record: RevisionRecord) -> SmallModel:
    source = model.spec.source.model_copy(update={"uri": record.uri, "digest": record.digest})
    spec = model.spec.model_copy(update={"source": source, "base_model": record.base_model})
    return model.model_copy(update={"spec": spec})


def effective_body(body: dict[str, Any], deprecations: Deprecations, now: dt.datetime) -> dict[str, Any]:
    """The SmallModel as it is to be served (its source replaced when its base is deprecated): what
    the weights are read for."""
    if deprecations.lookup((body.get("spec") or {}).get("baseModel"), now) is None:
        return body  # the common case: nothing to substitute, nothing to parse
    try:
        model = SmallModel.model_validate(body)
    except ValidationError:
        return body
    found = deprecated_base(model, deprecations, now)
    if found is None or found.target is None:
        return body
    served = _serve_record(model, found.target)
    return {**body, "spec": {**body["spec"], "source": served.spec.source.to_wire(), "baseModel": served.spec.base_model}}


def _ready_replicas(dep: dict[str, Any] | None) -> int:
    return int(((dep or {}).get("status") or {}).get("readyReplicas", 0))


def plan_model(obs: Observed, config: OperatorConfig, now: dt.datetime) -> Plan:
    body = obs.body
    meta = body["metadata"]
    generation = int(meta.get("generation", 1))
    name, namespace = meta["name"], meta["namespace"]
    try:
        model = SmallModel.model_validate(body)
    except ValidationError as exc:
        # The CRD schema rejects almost everything; this covers objects stored before a schema change.
        old = (
            SmallModelStatus.model_validate(body.get("status") or {})
            if isinstance(body.get("status"), dict)
            else SmallModelStatus()
        )
        st = _Status(old, generation, now)
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        st.condition("Degraded", True, "InvalidSpec", message)
        st.condition("Ready", False, "InvalidSpec", message)
        st.condition("Progressing", False, "InvalidSpec", "fix the spec")
        return _finish(
            old,
            old.model_copy(update={"conditions": st.conditions, "observed_generation": generation}),
            [],
            [],
            [],
            None,
        )

    old = model.status
    owner = ModelOwner(name=name, namespace=namespace, uid=meta.get("uid", ""))
    spec_model = model
    deprecated = deprecated_base(model, obs.deprecations, now)
    if deprecated is not None and deprecated.target is not None:
        model = _serve_record(model, deprecated.target)
    revision = revision_of(model.spec)
    inputs = sizing_inputs(model)
    # Only a new revision (new pods anyway) or a change of what sizing reads re-sizes the model;
    # scaling replicas keeps its GPUs.
    inputs_changed = old.sizing_inputs != inputs or old.revision != revision
    excluded = [] if inputs_changed else list(old.excluded_placements)
    st = _Status(old, generation, now)
    events: list[EventNote] = []
    requeue: float | None = None

    deployments = {(_revision_of_object(d) or ""): d for d in obs.deployments}
    replicas = model.spec.serving.replicas

    # The revision serving now, if it served (the stable a rollout compares with).
    stable = (
        old.serving_revision
        if old.serving_revision in deployments and any(h.revision == old.serving_revision for h in old.history)
        else None
    )

    def rollout_plan(**kwargs: Any) -> RolloutPlan | None:
        if obs.rollout is None:
            return None
        forced = deprecated is not None and revision != revision_of(spec_model.spec)
        candidate = stable if forced and stable else revision
        args: dict[str, Any] = dict(
            owner=owner,
            stable=stable,
            candidate=candidate,
            replicas=replicas,
            candidate_ready=False,
            candidate_failure=None,
            base_deprecated=deprecated.message if deprecated else None,
            history=list(old.history),
            route=obs.route,
            now=now,
            model_service=next((o for o in obs.services if o["metadata"]["name"] == name), None),
        )
        return plan_rollout(obs.rollout, **(args | kwargs))

    def degraded(reason: str, message: str, placement: Placement | None = None, permanent: bool = False) -> Plan:
        st.condition("Degraded", True, reason, message)
        serving = old.serving_revision if old.serving_revision in deployments else None
        st.condition(
            "Ready",
            serving is not None and _deployment_ready(deployments.get(serving), None),
            "ServingPreviousRevision" if serving else reason,
            f"revision {serving} keeps serving" if serving else message,
        )
        if placement is None and revision in deployments and old.revision == revision:
            placement = old.placement  # its Deployment still runs there
        st.condition("Progressing", False, reason, message)
        new = old.model_copy(
            update={
                "observed_generation": generation,
                "conditions": st.conditions,
                "revision": revision,
                "placement": placement,
                "fallbacks": [],
                "excluded_placements": excluded,
                "sizing_inputs": inputs,
            }
        )
        # A candidate that cannot serve for good (its weights fail their pin) fails its rollout; one
        # that fits nowhere says so on the rollout too.
        rollout = rollout_plan(
            candidate_failure=f"{reason}: {message}" if permanent else None,
            candidate_ready=_ready_replicas(deployments.get(revision)) > 0,
            candidate_unschedulable=message if reason == "NoFit" else None,
        )
        # Replaced revisions retire on time whatever else fails: one that outlived its grace period
        # may be what holds the GPUs the candidate waits for.
        delete, retry = retirements(
            (*obs.deployments, *obs.services), {revision, serving, stable}, grace_of(rollout, old.history), now
        )
        events.extend(retired_events(delete, serving))
        return dataclasses.replace(
            _finish(old, new, _hold_canary(rollout, placement), delete, events, _sooner(requeue, retry)),
            rollout=rollout,
        )

    def grace_of(rollout: RolloutPlan | None, history: Iterable[RevisionRecord]) -> dict[str, dt.datetime]:
        delay = rollout.spec.scale_down_delay_seconds if rollout is not None and rollout.spec is not None else None
        return retirement_grace(history, delay, now)

    def _hold_canary(rollout: RolloutPlan | None, placement: Placement | None) -> list[dict[str, Any]]:
        """While the candidate cannot be built anew, the weight and (after a rollback) its replicas
        are still the rollout's to set: a candidate that fails its pin mid-canary loses its traffic."""
        if rollout is None or not rollout.governed or stable is None:
            return []
        desired = [
            with_applied_hash(
                build_model_service(
                    owner,
                    stable,
                    config,
                    canary_revision=None if rollout.traffic else revision,
                    canary_weight=rollout.weight,
                )
            )
        ]
        if rollout.traffic is not None:
            desired.append(
                with_applied_hash(build_http_route(owner, rollout.traffic, stable, revision, rollout.weight, config))
            )
        if rollout.failed and revision in deployments and placement is not None:
            # Where it was placed, at 0: the same builder, so the next plan sees what it expects.
            at_zero = model.spec.model_copy(update={"serving": model.spec.serving.model_copy(update={"replicas": 0})})
            desired.append(with_applied_hash(build_deployment(owner, at_zero, placement, revision, config)))
        return _changed(desired, (*obs.deployments, *obs.services, obs.route))

    if deprecated is not None and deprecated.target is None:
        return degraded("BaseModelDeprecated", deprecated.message)

    weights = obs.weights
    verified = weights_verified(obs.pods, revision)
    if weights is not None and weights.problem:
        # Look again later: the storage may come back, or the user may fix what is stored.
        requeue = 30.0 if weights.transient else 300.0
        if not weights.transient:
            verified = ("False", weights.problem, weights.message)
        st.condition("WeightsVerified", *verified)
        return degraded(weights.problem, weights.message, permanent=not weights.transient)
    st.condition("WeightsVerified", *verified)

    if hf_config(model, weights) is None:
        return degraded(
            "ArchitectureUnknown",
            "the model's config.json could not be read and spec.architecture is not declared; declare the "
            "config.json facts (layers, hidden size, heads, KV heads, vocabulary, intermediate size, max "
            "position embeddings) so the model can be sized",
        )

    # The desired revision's own pods hold what it was placed on; an older revision's pods hold
    # GPUs until it is retired, so they count as used.
    own_pods = {
        p["metadata"]["uid"] for p in obs.pods if (p["metadata"].get("labels") or {}).get(REVISION_LABEL) == revision
    }
    inventory = sizing.inventory_from_nodes(
        obs.nodes, obs.gpu_pods, exclude_pods=lambda p: p.get("metadata", {}).get("uid") in own_pods
    )

    # Keep a working placement: re-sizing on every inventory change would churn pods.
    placement = old.placement if not inputs_changed else None
    fallbacks = list(old.fallbacks) if placement else []
    moved_reason = ""
    stuck = ""
    if placement is not None:
        if placement.key in {e.key for e in excluded}:
            # Given up on earlier, unless its pods got scheduled after all and are serving there.
            if not _deployment_ready(deployments.get(revision), None):
                placement = None
        elif (pending := _pending_since(obs.pods, revision, placement)) is not None:
            waited = (now - pending[0]).total_seconds()
            if waited >= config.pending_timeout_seconds:
                moved_reason = (
                    f"pods stayed Pending for {int(waited)}s on {placement.summary} "
                    f"(limit {config.pending_timeout_seconds}s): {pending[1]}"
                )
                excluded.append(ExcludedPlacement(key=placement.key, reason=moved_reason))
                placement = None
            else:
                requeue = config.pending_timeout_seconds - waited + 1
        elif not _still_fits(placement, inventory) and not _deployment_ready(deployments.get(revision), None):
            placement = None

    if placement is None:
        try:
            request = sizing_request(model, [e.key for e in excluded], weights)
        except sizing.SizingInputError as exc:
            return degraded("InvalidArchitecture", str(exc))
        result = sizing.plan_placement(request, inventory)
        if result.placement is None and excluded:
            # Every placement that fits has had Pending pods. Giving up would strand the model on a
            # transient cause (a claim binding late, a drained node), so stay on the best one and say so.
            best = sizing.plan_placement(dataclasses.replace(request, excluded=frozenset()), inventory)
            if best.placement is not None:
                result = best
                stuck = (
                    f"pods stayed Pending on every placement that fits ({', '.join(e.key for e in excluded)}); "
                    f"staying on {best.placement.gpu_product} x{best.placement.gpu_count}. Last: {excluded[-1].reason}"
                )
        if result.placement is None:
            if moved_reason:
                events.append(EventNote("Warning", "PlacementFallback", f"{moved_reason}; no other placement fits"))
            return degraded("NoFit", result.message)
        placement = to_api_placement(result.placement, result.profile, result.reasons)
        fallbacks = [_fallback(f) for f in result.fallbacks]
        if old.placement is None or old.placement.key != placement.key or inputs_changed:
            if moved_reason:
                where = f"staying on {placement.summary}" if stuck else f"moved to {placement.summary}"
                events.append(EventNote("Warning", "PlacementFallback", f"{moved_reason}; {where}"))
            elif old.placement is None or old.placement.key != placement.key:
                events.append(
                    EventNote("Normal", "Placed", f"{placement.summary}: " + "; ".join(placement.reasons[:2]))
                )

    # A ModelRollout governs the move from the stable revision to this one: it decides the canary
    # weight, the candidate's replicas, promotion and rollback.
    candidate_failure = verified[2] if verified[0] == "False" else None
    live = deployments.get(revision)
    rollout = rollout_plan(candidate_ready=_ready_replicas(live) > 0, candidate_failure=candidate_failure)
    # The rollout's decisions, or none (a model without a ModelRollout): RolloutPlan() governs nothing.
    ro = rollout if rollout is not None else RolloutPlan()
    governed = ro.governed
    promoted = governed and ro.promoted
    served_spec = model.spec
    if governed:
        served_spec = model.spec.model_copy(
            update={"serving": model.spec.serving.model_copy(update={"replicas": ro.candidate_replicas})}
        )

    try:
        disk = weights.disk_bytes if weights is not None else None
        desired_dep = with_applied_hash(
            keep_loader_image(build_deployment(owner, served_spec, placement, revision, config, disk), live)
        )
    except UnsupportedSource as exc:
        return degraded("SourceNotSupported", str(exc), placement)

    desired_ready = _deployment_ready(live, desired_dep)
    previous = (
        old.serving_revision if old.serving_revision in deployments and old.serving_revision != revision else None
    )
    if previous is not None:
        served = any(h.revision == previous for h in old.history)
        has_ready = int((deployments[previous].get("status") or {}).get("readyReplicas", 0)) > 0
        if not (served or has_ready):
            previous = None  # it never served: nothing to keep, and its GPUs are better freed now
    if governed:
        serving = revision if promoted or stable is None else stable  # governed: there is a stable
    else:
        serving = revision if desired_ready or previous is None else previous

    desired = [desired_dep, with_applied_hash(build_revision_service(owner, revision, config))]
    traffic = ro.traffic
    canary = governed and not promoted and traffic is None
    desired.append(
        with_applied_hash(
            build_model_service(
                owner,
                serving,
                config,
                canary_revision=revision if canary else None,
                canary_weight=ro.weight if canary else 0,
            )
        )
    )
    if traffic is not None:
        in_canary = governed and not promoted
        desired.append(
            with_applied_hash(
                build_http_route(
                    owner, traffic, serving, revision if in_canary else None, ro.weight if in_canary else 0, config
                )
            )
        )
    apply = _changed(desired, (*obs.deployments, *obs.services, obs.route))

    if old.revision != revision:
        events.append(
            EventNote("Normal", "NewRevision", f"revision {revision} for digest {model.spec.source.digest[:19]}…")
        )
    said = find(old.conditions, "Degraded")
    if deprecated is not None and (said is None or said.message != deprecated.message):
        events.append(EventNote("Warning", "BaseModelDeprecated", deprecated.message))

    dep_status = (live or {}).get("status") or {}
    ready_replicas = int(dep_status.get("readyReplicas", 0)) if live else 0
    stable_ready = _ready_replicas(deployments.get(stable)) if stable else 0
    if governed and ro.failed:
        reason = "BaseModelDeprecated" if deprecated is not None else "RolloutFailed"
        st.condition(
            "Degraded", True, reason, f"revision {revision}: {ro.failed}; revision {stable} keeps serving"
        )
    elif deprecated is not None:
        st.condition("Degraded", True, "BaseModelDeprecated", deprecated.message)
    elif (pull_failure := image_pull_failure(obs.pods, revision)) is not None and not desired_ready:
        st.condition("Degraded", True, "ImagePullFailed", pull_failure)
    elif stuck and not desired_ready:
        st.condition("Degraded", True, "PodsPending", stuck)
    else:
        st.condition("Degraded", False, "AsExpected", f"placed on {placement.summary}")
    if governed and not promoted:
        st.condition(
            "Ready",
            stable_ready > 0,
            "ServingPreviousRevision" if ro.failed else "Serving",
            f"revision {stable} serves ({stable_ready} ready)",
        )
        if ro.failed:
            st.condition("Progressing", False, "RolloutFailed", f"revision {revision} was rolled back")
        else:
            st.condition(
                "Progressing",
                True,
                "Canary",
                f"rollout of revision {revision}: {ro.phase}, {ro.weight}% of the traffic, "
                f"{ready_replicas} candidate replicas ready",
            )
    elif replicas == 0:
        st.condition("Ready", False, "ScaledToZero", "serving.replicas is 0")
        st.condition("Progressing", False, "Complete", f"revision {revision} is scaled to zero")
    elif desired_ready:
        st.condition(
            "Ready",
            True,
            "Serving",
            f"revision {revision}: {ready_replicas}/{replicas} replicas ready on {placement.summary}",
        )
        st.condition("Progressing", False, "Complete", f"revision {revision} is fully rolled out")
    else:
        waiting = f"revision {revision}: {ready_replicas}/{replicas} replicas ready on {placement.summary}"
        if serving != revision:
            st.condition("Ready", True, "ServingPreviousRevision", f"revision {serving} serves while {waiting}")
        elif promoted:
            st.condition("Ready", ready_replicas > 0, "Serving", f"revision {revision} was promoted; {waiting}")
        else:
            st.condition("Ready", False, "WaitingForReplicas", waiting)
        st.condition("Progressing", True, "RollingOut", waiting)

    history = list(old.history)
    record = dict(
        revision=revision,
        digest=model.spec.source.digest,
        uri=model.spec.source.uri,
        base_model=model.spec.base_model,
        since=st.now,
    )
    if promoted and (not history or history[-1].revision != revision or history[-1].outcome != "Promoted"):
        history = [
            h.model_copy(update={"outcome": "Replaced"}) if h.outcome == "Serving" else h
            for h in history
            if h.revision != revision
        ]
        history.append(RevisionRecord(outcome="Promoted", **record))
    elif governed and ro.failed and not any(h.revision == revision and h.outcome == "RolledBack" for h in history):
        history = [h for h in history if h.revision != revision]
        history.append(RevisionRecord(outcome="RolledBack", **record))
    elif not governed and desired_ready and serving == revision and (not history or history[-1].revision != revision):
        history = [h.model_copy(update={"outcome": "Replaced"}) if h.outcome == "Serving" else h for h in history]
        history.append(RevisionRecord(outcome="Serving", **record))
    history = history[-MAX_HISTORY:]

    # Old revisions go once the desired one serves: a plain replacement without a gap. Under a
    # rollout, the stable stays until the candidate is promoted, and a replaced revision for the
    # rollout's grace period after its successor started serving.
    keep: set[str | None] = {revision, serving, stable} if governed else {revision, serving}
    delete, retry = retirements((*obs.deployments, *obs.services), keep, grace_of(rollout, history), now)
    requeue = _sooner(requeue, retry)
    events.extend(retired_events(delete, serving))

    new = old.model_copy(
        update={
            "history": history,
            "observed_generation": generation,
            "conditions": st.conditions,
            "revision": revision,
            "serving_revision": serving,
            "placement": placement,
            "fallbacks": fallbacks,
            "excluded_placements": excluded,
            "sizing_inputs": inputs,
            "replicas": replicas,
            "ready_replicas": stable_ready if governed and not promoted else ready_replicas,
            "endpoint": model_endpoint(owner, config),
        }
    )
    plan = _finish(old, new, apply, delete, events, requeue)
    candidate_gpus = ro.candidate_replicas if governed and not promoted else 0
    serving_gpus = replicas
    return Plan(
        apply=plan.apply,
        delete=plan.delete,
        status=plan.status,
        events=plan.events,
        requeue_after=_sooner(plan.requeue_after, ro.requeue_after),
        gpus={placement.gpu_product: placement.gpu_count * (candidate_gpus + serving_gpus)},
        conditions=plan.conditions,
        rollout=rollout,
    )


def _changed(desired: list[dict[str, Any]], live: Iterable[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The desired objects whose live version was applied from something else (by applied hash)."""
    hashes = {
        (o["kind"], o["metadata"]["name"]): (o["metadata"].get("annotations") or {}).get(APPLIED_HASH)
        for o in live
        if o is not None
    }
    return [
        o
        for o in desired
        if hashes.get((o["kind"], o["metadata"]["name"])) != o["metadata"]["annotations"][APPLIED_HASH]
    ]


def _sooner(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _finish(
    old: SmallModelStatus,
    new: SmallModelStatus,
    apply: list[dict[str, Any]],
    delete: list[Deletion],
    events: list[EventNote],
    requeue: float | None,
) -> Plan:
    events = events + _changed_condition_events(old.conditions, new.conditions)
    old_wire, new_wire = old.to_wire(), new.to_wire()
    return Plan(
        apply=tuple(apply),
        delete=tuple(delete),
        status=new_wire if new_wire != old_wire else None,
        events=tuple(events),
        requeue_after=requeue,
        conditions={c.type: c.status for c in new.conditions},
    )
