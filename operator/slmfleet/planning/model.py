"""Decide what a SmallModel needs, as data: the plan half of plan-then-act.

`plan_model` takes everything observed about one SmallModel (its parsed spec, what it owns, the
nodes and GPU pods, its ModelRollout) plus the clock, and returns the objects to apply, the objects
to delete, the status to write and the Events to post. It does no I/O, so every decision is
unit-tested without a cluster; `controller.execute` carries the plan out. Level-based: the same
observation always gives the same plan, and a world that already matches gives an empty one.

The plan is a short pipeline: see what the model is (`_subject`), stop at what blocks it (a
deprecated base with nothing to fall back to, vLLM flags a tenant may not pass, weights that fail
their pin, no architecture, no placement), then let the rollout decide the candidate's share,
build the desired objects, say what serves, record the history and retire what is no longer needed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from slmfleet.api.conditions import find
from slmfleet.api.config import OperatorConfig
from slmfleet.api.smallmodel import ExcludedPlacement, Placement, RevisionRecord, SmallModel, SmallModelStatus
from slmfleet.builders import ModelOwner, UnsupportedSource, model_endpoint, revision_of
from slmfleet.planning.common import (
    Deletion,
    EventNote,
    Failure,
    InvalidSpec,
    changed,
    deployment_ready,
    parse_model,
    ready_replicas,
    revision_of_object,
    sooner,
)
from slmfleet.planning.deprecation import Deprecated, deprecated_base, serve_record
from slmfleet.planning.desired import Target, traffic_objects
from slmfleet.planning.extra_args import extra_args_refused
from slmfleet.planning.placement import PlacementRequest, choose_placement, hf_config, inventory_for, sizing_inputs
from slmfleet.planning.retire import retire
from slmfleet.planning.rollout import RolloutInputs, RolloutObserved, RolloutPlan, plan_rollout
from slmfleet.planning.status import (
    StatusDraft,
    changed_condition_events,
    image_pull_failure,
    loader_finished_at,
    next_history,
    revision_pods_ready,
    vllm_start_failure,
    weights_verified,
)
from slmfleet.rollout.deprecations import Deprecations
from slmfleet.sizing.inventory import LiveInventory
from slmfleet.weights.facts import WeightsFacts, WeightsReading


@dataclass(frozen=True)
class Observed:
    """One SmallModel and the slice of the world it depends on: the body parsed once (`of`), the
    objects as plain API dicts."""

    body: dict[str, Any]
    model: SmallModel | InvalidSpec
    deployments: tuple[dict[str, Any], ...] = ()  # owned by this model
    services: tuple[dict[str, Any], ...] = ()  # owned by this model
    pods: tuple[dict[str, Any], ...] = ()  # this model's pods
    nodes: tuple[dict[str, Any], ...] = ()
    # Every pod in the cluster that requests GPUs, and every model pod (CPU placements hold cores and memory).
    gpu_pods: tuple[dict[str, Any], ...] = ()
    # The inventory kept from watch events; when given, `nodes` and `gpu_pods` are not read.
    cluster: LiveInventory | None = None
    weights: WeightsFacts | WeightsReading | None = None  # read from the source before any pod (S3 sources)
    rollout: RolloutObserved | None = None  # the ModelRollout governing this model, if any
    route: dict[str, Any] | None = None  # the model's live HTTPRoute (HTTPRoute traffic only)
    deprecations: Deprecations = Deprecations()
    conflict: str | None = None  # "<Kind> <name>": an object of another owner the model's names collide with

    @classmethod
    def of(cls, body: dict[str, Any], **observed: Any) -> Observed:
        return cls(body, parse_model(body), **observed)


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


@dataclass(frozen=True)
class Subject:
    """What every step reads: the model as it is to be served, and where it stands."""

    obs: Observed
    config: OperatorConfig
    now: dt.datetime
    model: SmallModel  # as served: a deprecated base's fallback source replaces the spec's
    owner: ModelOwner
    generation: int
    revision: str  # the revision to serve
    spec_revision: str  # the revision the spec as written names
    sizing_inputs: str
    resize: bool  # only a new revision or a change of what sizing reads re-sizes the model
    deployments: dict[str, dict[str, Any]]  # by revision
    stable: str | None  # the revision serving now, if it served: what a rollout compares with
    deprecated: Deprecated | None

    @property
    def old(self) -> SmallModelStatus:
        return self.model.status

    @property
    def replicas(self) -> int:
        return self.model.spec.serving.replicas

    @property
    def weights(self) -> WeightsFacts | None:
        """What the operator's own read of the source found (None: not read, or not yet)."""
        return self.obs.weights if isinstance(self.obs.weights, WeightsFacts) else None

    def target(self) -> Target:
        disk = self.weights.disk_bytes if self.weights is not None else None
        return Target(self.owner, self.model.spec, self.revision, self.config, disk, self.deployments.get(self.revision))


@dataclass
class Draft:
    """What the steps decided so far, for the plan that ends the pipeline (early or not)."""

    status: StatusDraft
    excluded: tuple[ExcludedPlacement, ...]  # placements given up on (pods stayed Pending)
    events: list[EventNote] = field(default_factory=list)
    requeue: float | None = None

    def look_again_in(self, seconds: float | None) -> None:
        self.requeue = sooner(self.requeue, seconds)


def plan_model(obs: Observed, config: OperatorConfig, now: dt.datetime) -> Plan:
    if isinstance(obs.model, InvalidSpec):
        return _plan_invalid(obs, obs.model.message, now)
    s = _subject(obs, obs.model, config, now)
    draft = Draft(StatusDraft(s.old, s.generation, now), () if s.resize else tuple(s.old.excluded_placements))
    if obs.conflict is not None:
        draft.look_again_in(CONFLICT_RECHECK_SECONDS)  # foreign objects are not watched
        return _plan_blocked(s, draft, Failure("Conflict", f"{obs.conflict} already exists and is not this SmallModel's; "
                                                           "the operator leaves it untouched: rename the SmallModel "
                                                           "or remove that object", names_taken=True))
    if s.deprecated is not None and s.deprecated.target is None:
        return _plan_blocked(s, draft, Failure("BaseModelDeprecated", s.deprecated.message))
    if (refused := extra_args_refused(s.model.spec.serving, config)) is not None:
        return _plan_blocked(s, draft, refused)
    verified = weights_verified(obs.pods, s.revision)
    if (blocked := _check_weights(s, draft, verified)) is not None:
        return _plan_blocked(s, draft, blocked)
    if hf_config(s.model, s.weights) is None:
        return _plan_blocked(s, draft, Failure("ArchitectureUnknown", ARCHITECTURE_UNKNOWN))
    if s.model.spec.resources.accelerator == "cpu" and config.cpu_vllm_image is None:
        return _plan_blocked(s, draft, Failure(
            "NoCpuImage", "resources.accelerator is cpu, but this installation has no CPU vLLM image "
            "(the operator config's cpuVllmImage)"))
    decision = choose_placement(PlacementRequest(
        model=s.model, old=s.old, revision=s.revision, resize=s.resize, excluded=draft.excluded,
        weights=s.weights, inventory=inventory_for(obs.nodes, obs.gpu_pods, obs.pods, s.revision, obs.cluster,
                                (s.owner.namespace, s.owner.name)),
        live=s.deployments.get(s.revision), pods=obs.pods, pending_timeout_seconds=config.pending_timeout_seconds,
        now=now, cpu_allowed=config.cpu_vllm_image is not None))
    draft.excluded = decision.excluded
    draft.events.extend(decision.events)
    draft.look_again_in(decision.requeue_after)
    if decision.placement is None:
        assert decision.failure is not None
        return _plan_blocked(s, draft, decision.failure)
    return _plan_placed(s, draft, decision.placement, decision.fallbacks, decision.stuck, verified)


CONFLICT_RECHECK_SECONDS = 30.0

ARCHITECTURE_UNKNOWN = (
    "the model's config.json could not be read and spec.architecture is not declared; declare the "
    "config.json facts (layers, hidden size, heads, KV heads, vocabulary, intermediate size, max "
    "position embeddings) so the model can be sized"
)


def _subject(obs: Observed, spec_model: SmallModel, config: OperatorConfig, now: dt.datetime) -> Subject:
    meta = obs.body["metadata"]
    old = spec_model.status
    deprecated = deprecated_base(spec_model, obs.deprecations, now)
    model = serve_record(spec_model, deprecated.target) if deprecated and deprecated.target else spec_model
    revision = revision_of(model.spec)
    inputs = sizing_inputs(model)
    deployments = {(revision_of_object(d) or ""): d for d in obs.deployments}
    served = old.serving_revision in deployments and any(h.revision == old.serving_revision for h in old.history)
    return Subject(
        obs=obs, config=config, now=now, model=model,
        owner=ModelOwner(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid", "")),
        generation=int(meta.get("generation", 1)), revision=revision, spec_revision=revision_of(spec_model.spec),
        sizing_inputs=inputs, resize=old.sizing_inputs != inputs or old.revision != revision,
        deployments=deployments, stable=old.serving_revision if served else None, deprecated=deprecated,
    )


def _check_weights(s: Subject, draft: Draft, verified: tuple[str, str, str]) -> Failure | None:
    """WeightsVerified, from the operator's own read of the source and the loaders' verdicts. The
    model waits for a first read to end; one that failed blocks it (and is read again later: the
    storage may come back, or the user may fix what is stored)."""
    weights = s.obs.weights
    if isinstance(weights, WeightsReading):
        draft.status.condition("WeightsVerified", "Unknown", "Reading", weights.message)
        return Failure("ReadingWeights", weights.message, degraded=False)
    if weights is None or not weights.problem:
        draft.status.condition("WeightsVerified", *verified)
        return None
    draft.look_again_in(30.0 if weights.transient else 300.0)
    if not weights.transient:
        verified = ("False", weights.problem, weights.message)
    draft.status.condition("WeightsVerified", *verified)
    return Failure(weights.problem, weights.message, permanent=not weights.transient)


def _plan_rollout(s: Subject, *, candidate_ready: bool, candidate_failure: str | None = None,
                  candidate_unschedulable: str | None = None) -> RolloutPlan | None:
    """The governing ModelRollout's plan. A deprecation's forced fallback to the stable revision
    is no candidate: the rollout sees the stable as desired."""
    if s.obs.rollout is None:
        return None
    forced = s.deprecated is not None and s.revision != s.spec_revision
    candidate = s.stable if forced and s.stable else s.revision
    model_service = next((o for o in s.obs.services if o["metadata"]["name"] == s.owner.name), None)
    return plan_rollout(s.obs.rollout, RolloutInputs(
        owner=s.owner, stable=s.stable, candidate=candidate, replicas=s.replicas, history=tuple(s.old.history),
        model_service=model_service, route=s.obs.route, now=s.now, candidate_ready=candidate_ready,
        candidate_failure=candidate_failure, candidate_unschedulable=candidate_unschedulable,
        base_deprecated=s.deprecated.message if s.deprecated else None))


def _retire(s: Subject, draft: Draft, keep: set[str | None], rollout: RolloutPlan | None,
            history: list[RevisionRecord], serving: str | None) -> list[Deletion]:
    delay = rollout.spec.scale_down_delay_seconds if rollout is not None and rollout.spec is not None else None
    delete, events, retry = retire((*s.obs.deployments, *s.obs.services), keep, history, delay, serving, s.now)
    draft.events.extend(events)
    draft.look_again_in(retry)
    return delete


def _plan_blocked(s: Subject, draft: Draft, failure: Failure, placement: Placement | None = None) -> Plan:
    """The model cannot get what its spec asks for, or not yet: say why, keep serving what serves,
    and let a rollout hold its canary. Replaced revisions still retire on time: one that outlived its grace
    period may be what holds the GPUs the candidate waits for."""
    serving = s.old.serving_revision if s.old.serving_revision in s.deployments else None
    st = draft.status
    if failure.degraded:
        st.condition("Degraded", True, failure.reason, failure.message)
    st.condition("Ready", serving is not None and deployment_ready(s.deployments.get(serving), None),
                 "ServingPreviousRevision" if serving else failure.reason,
                 f"revision {serving} keeps serving" if serving else failure.message)
    st.condition("Progressing", not failure.degraded, failure.reason, failure.message)
    if placement is None and s.revision in s.deployments and s.old.revision == s.revision:
        placement = s.old.placement  # its Deployment still runs there
    new = s.old.model_copy(update={
        "observed_generation": s.generation, "conditions": st.conditions, "revision": s.revision,
        "placement": placement, "fallbacks": [], "excluded_placements": list(draft.excluded),
        "sizing_inputs": s.sizing_inputs,
    })
    # A candidate that cannot serve for good (its weights fail their pin) fails its rollout; one
    # that fits nowhere says so on the rollout too.
    rollout = _plan_rollout(
        s, candidate_ready=ready_replicas(s.deployments.get(s.revision)) > 0,
        candidate_failure=f"{failure.reason}: {failure.message}" if failure.permanent else None,
        candidate_unschedulable=failure.message if failure.reason == "NoFit" else None)
    delete = _retire(s, draft, {s.revision, serving, s.stable}, rollout, list(s.old.history), serving)
    # Nothing is applied next to another owner's object: the model's names are not its own yet.
    apply = [] if failure.names_taken else _hold_canary(s, rollout, placement)
    return replace(_finish(s.old, new, apply, delete, draft), rollout=rollout)


def _hold_canary(s: Subject, rollout: RolloutPlan | None, placement: Placement | None) -> list[dict[str, Any]]:
    """While the candidate cannot be built anew, the weight and (after a rollback) its replicas
    are still the rollout's to set: a candidate that fails its pin mid-canary loses its traffic."""
    if rollout is None or not rollout.governed or s.stable is None:
        return []
    target = s.target()
    desired = traffic_objects(target, s.stable, s.revision, rollout.weight, rollout.traffic)
    live = s.deployments.get(s.revision)
    if rollout.failed and live is not None and (live.get("spec") or {}).get("replicas", 1) != 0 and placement is not None:
        # Where it was placed, at 0: the same builder, so the next plan sees what it expects. One
        # already at 0 stays as it is: what the weights' read would add to it is unknown here.
        try:
            desired.append(target.deployment(placement, replicas=0))
        except UnsupportedSource:
            pass  # nothing of it can run anyway; its Service and route still lose their weight
    return changed(desired, (*s.obs.deployments, *s.obs.services, s.obs.route))


def _plan_placed(s: Subject, draft: Draft, placement: Placement, fallbacks: tuple[Any, ...], stuck: str,
                 verified: tuple[str, str, str]) -> Plan:
    """The model has a placement: a rollout decides the candidate's share, the desired objects
    follow, then what serves, the conditions, the history and what retires."""
    live = s.deployments.get(s.revision)
    rollout = _plan_rollout(s, candidate_ready=ready_replicas(live) > 0,
                            candidate_failure=verified[2] if verified[0] == "False" else None)
    ro = rollout if rollout is not None else RolloutPlan()  # RolloutPlan() governs nothing
    in_canary = ro.governed and not ro.promoted
    target = s.target()
    try:
        deployment = target.deployment(placement, ro.candidate_replicas if ro.governed else None)
    except UnsupportedSource as exc:
        return _plan_blocked(s, draft, Failure("SourceNotSupported", str(exc)), placement)
    desired_ready = deployment_ready(live, deployment)
    serving = _serving_revision(s, ro, desired_ready)
    desired = [deployment,
               *traffic_objects(target, serving, s.revision if in_canary else None, ro.weight, ro.traffic)]
    apply = changed(desired, (*s.obs.deployments, *s.obs.services, s.obs.route))
    _revision_events(s, draft)
    ready = ready_replicas(live)
    stable_ready = ready_replicas(s.deployments.get(s.stable)) if s.stable else 0
    _serving_conditions(s, draft.status, ro, placement, serving=serving, desired_ready=desired_ready,
                        ready=ready, stable_ready=stable_ready, stuck=stuck)
    record = RevisionRecord(revision=s.revision, digest=s.model.spec.source.digest, uri=s.model.spec.source.uri,
                            base_model=s.model.spec.base_model, since=draft.status.now, outcome="Serving")
    history = next_history(s.old.history, record, promoted=ro.governed and ro.promoted,
                           rolled_back=ro.governed and bool(ro.failed),
                           now_serving=not ro.governed and desired_ready and serving == s.revision)
    # Old revisions go once the desired one serves: a plain replacement without a gap. Under a
    # rollout, the stable stays until the candidate is promoted, and a replaced revision for the
    # rollout's grace period after its successor started serving.
    keep: set[str | None] = {s.revision, serving, s.stable} if ro.governed else {s.revision, serving}
    delete = _retire(s, draft, keep, rollout, history, serving)
    new = s.old.model_copy(update={
        "history": history, "observed_generation": s.generation, "conditions": draft.status.conditions,
        "revision": s.revision, "serving_revision": serving, "placement": placement, "fallbacks": list(fallbacks),
        "excluded_placements": list(draft.excluded), "sizing_inputs": s.sizing_inputs, "replicas": s.replicas,
        "ready_replicas": stable_ready if in_canary else ready, "endpoint": model_endpoint(s.owner, s.config),
    })
    new = _hold_lone_verification(s, new, draft)
    plan = _finish(s.old, new, apply, delete, draft)
    candidate_replicas = ro.candidate_replicas if in_canary else 0
    return replace(plan, requeue_after=sooner(plan.requeue_after, ro.requeue_after), rollout=rollout,
                   gpus={} if placement.accelerator == "cpu"
                   else {placement.gpu_product: placement.gpu_count * (candidate_replicas + s.replicas)})


VERIFIED_HOLD_SECONDS = 30.0
"""How long a loader's success waits to be written with the Ready that usually follows it."""
VERIFIED_HOLD_PODS_READY_SECONDS = 300.0
"""How long it waits when the pods are Ready already and only the Deployment's status lags (its
controller updates it late on a busy control plane: 66-109 s at a thousand models created at once)."""


def _hold_lone_verification(s: Subject, new: SmallModelStatus, draft: Draft) -> SmallModelStatus:
    """The status without a WeightsVerified success that would be its only change, for up to
    VERIFIED_HOLD_SECONDS after the loader finished.

    A pod's server starts only after its loader verified every file, so Ready implies the
    verification; written apart, they cost two status writes per new model where one says both.
    A server that takes longer to start gets the verification written when the hold ends (the
    plan looks again then); the hold is longer while the pods are Ready already, waiting only for
    the Deployment controller to say so."""
    before, after = find(s.old.conditions, "WeightsVerified"), find(new.conditions, "WeightsVerified")
    if after is None or after.status != "True" or (before is not None and before.status == "True"):
        return new
    finished = loader_finished_at(s.obs.pods, s.revision)
    if finished is None:
        return new
    hold = VERIFIED_HOLD_PODS_READY_SECONDS if revision_pods_ready(s.obs.pods, s.revision) else VERIFIED_HOLD_SECONDS
    left = hold - (s.now - finished).total_seconds()
    conditions = [before if c.type == "WeightsVerified" else c for c in new.conditions]
    held = new.model_copy(update={"conditions": [c for c in conditions if c is not None]})
    if left <= 0 or held.to_wire() != s.old.to_wire():
        return new  # the hold is over, or the status is written anyway: the verification goes with it
    draft.look_again_in(left)
    return held


def _serving_revision(s: Subject, ro: RolloutPlan, desired_ready: bool) -> str:
    """Which revision the model Service selects. Governed: the stable until the candidate is
    promoted. Otherwise the desired one once ready, the previous one (if it served) until then."""
    if ro.governed:
        return s.revision if ro.promoted or s.stable is None else s.stable
    previous = s.old.serving_revision
    if previous not in s.deployments or previous == s.revision or previous is None:
        return s.revision
    served = any(h.revision == previous for h in s.old.history)
    if not (served or ready_replicas(s.deployments[previous]) > 0):
        return s.revision  # it never served: nothing to keep, and its GPUs are better freed now
    return s.revision if desired_ready else previous


def _revision_events(s: Subject, draft: Draft) -> None:
    # A model's first revision is announced by its Placed Event (which names it); a new one, here.
    if s.old.revision is not None and s.old.revision != s.revision:
        draft.events.append(EventNote("Normal", "NewRevision",
                                      f"revision {s.revision} for digest {s.model.spec.source.digest[:19]}…"))
    said = find(s.old.conditions, "Degraded")
    if s.deprecated is not None and (said is None or said.message != s.deprecated.message):
        draft.events.append(EventNote("Warning", "BaseModelDeprecated", s.deprecated.message))


def _serving_conditions(s: Subject, st: StatusDraft, ro: RolloutPlan, placement: Placement, *, serving: str,
                        desired_ready: bool, ready: int, stable_ready: int, stuck: str) -> None:
    """Degraded, Ready and Progressing of a placed model."""
    revision, replicas = s.revision, s.replicas
    if ro.governed and ro.failed:
        reason = "BaseModelDeprecated" if s.deprecated is not None else "RolloutFailed"
        st.condition("Degraded", True, reason, f"revision {revision}: {ro.failed}; revision {s.stable} keeps serving")
    elif s.deprecated is not None:
        st.condition("Degraded", True, "BaseModelDeprecated", s.deprecated.message)
    elif (pull_failure := image_pull_failure(s.obs.pods, revision)) is not None and not desired_ready:
        st.condition("Degraded", True, "ImagePullFailed", pull_failure)
    elif (start_failure := vllm_start_failure(s.obs.pods, revision)) is not None and not desired_ready:
        st.condition("Degraded", True, "VllmStartFailed", start_failure)
    elif stuck and not desired_ready:
        st.condition("Degraded", True, "PodsPending", stuck)
    else:
        st.condition("Degraded", False, "AsExpected", f"placed on {placement.summary}")
    waiting = f"revision {revision}: {ready}/{replicas} replicas ready on {placement.summary}"
    if ro.governed and not ro.promoted:
        st.condition("Ready", stable_ready > 0, "ServingPreviousRevision" if ro.failed else "Serving",
                     f"revision {s.stable} serves ({stable_ready} ready)")
        if ro.failed:
            st.condition("Progressing", False, "RolloutFailed", f"revision {revision} was rolled back")
        else:
            st.condition("Progressing", True, "Canary", f"rollout of revision {revision}: {ro.phase}, {ro.weight}% of "
                                                        f"the traffic, {ready} candidate replicas ready")
    elif replicas == 0:
        st.condition("Ready", False, "ScaledToZero", "serving.replicas is 0")
        st.condition("Progressing", False, "Complete", f"revision {revision} is scaled to zero")
    elif desired_ready:
        st.condition("Ready", True, "Serving", waiting)
        st.condition("Progressing", False, "Complete", f"revision {revision} is fully rolled out")
    else:
        if serving != revision:
            st.condition("Ready", True, "ServingPreviousRevision", f"revision {serving} serves while {waiting}")
        elif ro.promoted:
            st.condition("Ready", ready > 0, "Serving", f"revision {revision} was promoted; {waiting}")
        else:
            st.condition("Ready", False, "WaitingForReplicas", waiting)
        st.condition("Progressing", True, "RollingOut", waiting)


def _plan_invalid(obs: Observed, message: str, now: dt.datetime) -> Plan:
    """The CRD schema rejects almost everything; this covers objects stored before a schema change."""
    body = obs.body
    generation = int(body["metadata"].get("generation", 1))
    try:
        old = SmallModelStatus.model_validate(body.get("status") or {})
    except ValidationError:
        old = SmallModelStatus()  # the status is the operator's own: rewritten whole
    st = StatusDraft(old, generation, now)
    st.condition("Degraded", True, "InvalidSpec", message)
    st.condition("Ready", False, "InvalidSpec", message)
    st.condition("Progressing", False, "InvalidSpec", "fix the spec")
    new = old.model_copy(update={"conditions": st.conditions, "observed_generation": generation})
    return _finish(old, new, [], [], Draft(st, ()))


def _finish(old: SmallModelStatus, new: SmallModelStatus, apply: list[dict[str, Any]], delete: list[Deletion],
            draft: Draft) -> Plan:
    old_wire, new_wire = old.to_wire(), new.to_wire()
    return Plan(
        apply=tuple(apply),
        delete=tuple(delete),
        status=new_wire if new_wire != old_wire else None,
        events=(*draft.events, *changed_condition_events(old.conditions, new.conditions, served=bool(old.history))),
        requeue_after=draft.requeue,
        conditions={c.type: c.status for c in new.conditions},
    )
