"""Where a model runs: the sizing request from its spec and weights, and the placement it keeps,
moves from (pods Pending too long) or gets anew."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from slmfleet import sizing
from slmfleet.api.smallmodel import (
    ExcludedPlacement,
    FallbackPlacement,
    MemoryBreakdown,
    Placement,
    SmallModel,
    SmallModelStatus,
)
from slmfleet.api.timestamps import parse_rfc3339
from slmfleet.builders.labels import PLACEMENT_ANNOTATION, REVISION_LABEL
from slmfleet.planning.common import EventNote, Failure, deployment_ready, on_its_node, ready_replicas
from slmfleet.weights.facts import WeightsFacts


def to_api_placement(chosen: sizing.Placement, profile: sizing.MemoryProfile, reasons: Iterable[str]) -> Placement:
    on_cpu = chosen.accelerator == "cpu"
    return Placement(
        accelerator="cpu" if on_cpu else "gpu",
        memory_bytes=chosen.memory_bytes if on_cpu else None,
        kv_cache_gib=chosen.kv_cache_gib if on_cpu else None,
        dtype=chosen.dtype if on_cpu else None,
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
        summary=placement_summary(chosen.gpu_product, chosen.gpu_count, on_cpu),
        reasons=list(reasons),
    )


def placement_summary(product: str, count: int, on_cpu: bool) -> str:
    """`NVIDIA-L4 x1`, or `CPU-BF16 4 cores`, for `kubectl get`."""
    return f"{product} {count} cores" if on_cpu else f"{product} x{count}"


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


def sizing_request(model: SmallModel, excluded: Iterable[str], weights: WeightsFacts | None = None,
                   cpu_allowed: bool = True) -> sizing.SizingRequest:
    """`cpu_allowed`: whether the installation can run CPU placements (it has a CPU vLLM image);
    without, `auto` means GPUs only."""
    spec = model.spec
    accelerator = spec.resources.accelerator
    if accelerator == "auto" and not cpu_allowed:
        accelerator = "gpu"
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
        accelerator=accelerator,
        cpu_cores=spec.resources.cpu_cores,
        replicas=max(1, spec.serving.replicas),
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


def inventory_for(nodes: Iterable[dict[str, Any]], gpu_pods: Iterable[dict[str, Any]],
                  model_pods: Iterable[dict[str, Any]], revision: str,
                  cluster: sizing.LiveInventory | None = None, model: tuple[str, str] | None = None) -> sizing.Inventory:
    """The GPUs free for the revision: its own pods hold what it was placed on, so they do not
    count; an older revision's pods hold GPUs until it is retired, so they do. From `cluster` when
    the operator keeps one (less what other Deployments reserve for pods not bound yet; the
    revision's own reservation, for `model`, is its own), else counted from `nodes` and `gpu_pods`."""
    own = frozenset(p["metadata"]["uid"] for p in model_pods
                    if (p["metadata"].get("labels") or {}).get(REVISION_LABEL) == revision)
    if cluster is not None:
        return cluster.inventory(own, None if model is None else (model, revision))
    return sizing.inventory_from_nodes(nodes, gpu_pods, exclude_pods=lambda p: p.get("metadata", {}).get("uid") in own)


def room_for(placement: Placement, inventory: sizing.Inventory, enough: int | None = None) -> int:
    """How many pods of the placement the free devices (or cores and memory) hold, on nodes its
    selector matches, counting no further than `enough`. The inventory does not count the
    revision's own pods, so the devices they hold are room too."""
    def matches(labels: Any) -> bool:
        return all(labels.get(k) == v for k, v in placement.node_selector.items())
    if placement.accelerator == "cpu":
        millicores, memory = placement.gpu_count * 1000, placement.memory_bytes or 0
        per_node = (min(n.free_millicores // millicores, n.free_memory // memory if memory else 1 << 30)
                    for n in inventory.cpu_nodes if matches(n.labels))
    else:
        per_node = (n.free // placement.gpu_count for n in inventory.nodes
                    if n.device.resource == placement.gpu_resource and n.device.product == placement.gpu_product
                    and matches(n.labels))
    room = 0
    for pods in per_node:
        room += pods
        if enough is not None and room >= enough:
            break
    return room


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
                since = parse_rfc3339(cond.get("lastTransitionTime")) or parse_rfc3339(meta.get("creationTimestamp"))
                if since and (oldest is None or since < oldest[0]):
                    oldest = (since, cond.get("message") or cond.get("reason") or "Unschedulable")
    return oldest


@dataclass(frozen=True)
class PlacementRequest:
    """What choosing a placement reads: the model as served, where it was, and its pods."""

    model: SmallModel
    old: SmallModelStatus
    revision: str
    resize: bool  # the revision or what sizing reads changed: place anew
    excluded: tuple[ExcludedPlacement, ...]  # placements given up on (pods stayed Pending)
    weights: WeightsFacts | None
    inventory: sizing.Inventory
    live: dict[str, Any] | None  # the revision's Deployment
    pods: tuple[dict[str, Any], ...]  # the model's pods
    pending_timeout_seconds: int
    now: dt.datetime
    cpu_allowed: bool = True  # the installation has a CPU vLLM image


@dataclass(frozen=True)
class PlacementDecision:
    placement: Placement | None  # None: `failure` says why
    failure: Failure | None = None
    fallbacks: tuple[FallbackPlacement, ...] = ()
    excluded: tuple[ExcludedPlacement, ...] = ()
    events: tuple[EventNote, ...] = ()
    requeue_after: float | None = None  # when the pods' Pending time runs out
    stuck: str = ""  # staying on a placement whose pods stay Pending everywhere: why


def choose_placement(req: PlacementRequest) -> PlacementDecision:
    """Keep a working placement (re-sizing on every inventory change would churn pods); give it up
    when its pods stay Pending past the timeout or it no longer fits before serving; else size anew."""
    kept, excluded, moved_reason, requeue = _keep_placement(req)
    if kept is not None:
        # Pods Pending there wait out pendingTimeoutSeconds (a node may be on its way), whatever
        # the room: the timeout is the platform team's say on how long that is worth.
        moved = _moved_for_replicas(req, kept, excluded) if requeue is None else None
        return moved or PlacementDecision(kept, fallbacks=tuple(req.old.fallbacks), excluded=excluded,
                                          requeue_after=requeue)
    try:
        request = sizing_request(req.model, [e.key for e in excluded], req.weights, req.cpu_allowed)
    except sizing.SizingInputError as exc:
        return PlacementDecision(None, Failure("InvalidArchitecture", str(exc)), excluded=excluded, requeue_after=requeue)
    result = sizing.plan_placement(request, req.inventory)
    stuck = ""
    if result.placement is None and excluded:
        # Every placement that fits has had Pending pods. Giving up would strand the model on a
        # transient cause (a claim binding late, a drained node), so stay on the best one and say so.
        best = sizing.plan_placement(dataclasses.replace(request, excluded=frozenset()), req.inventory)
        if best.placement is not None:
            result, chosen = best, best.placement
            where = placement_summary(chosen.gpu_product, chosen.gpu_count, chosen.accelerator == "cpu")
            stuck = (f"pods stayed Pending on every placement that fits ({', '.join(e.key for e in excluded)}); "
                     f"staying on {where}. Last: {excluded[-1].reason}")
    if result.placement is None:
        events = (EventNote("Warning", "PlacementFallback", f"{moved_reason}; no other placement fits"),) if moved_reason else ()
        return PlacementDecision(None, Failure("NoFit", result.message), excluded=excluded, events=events,
                                 requeue_after=requeue)
    placement = to_api_placement(result.placement, result.profile, result.reasons)
    return PlacementDecision(placement, fallbacks=tuple(_fallback(f) for f in result.fallbacks), excluded=excluded,
                             events=_placed_events(req, placement, moved_reason, stuck), requeue_after=requeue,
                             stuck=stuck)


def _moved_for_replicas(req: PlacementRequest, kept: Placement,
                        excluded: tuple[ExcludedPlacement, ...]) -> PlacementDecision | None:
    """A kept placement without room for every replica (a scale-up, a node gone) gives way to one
    with room for all of them, before pods are made that could only wait Pending; with no such
    placement, the model keeps serving what fits where it is."""
    replicas = req.model.spec.serving.replicas
    # Other models' reservations may be counted against the devices the revision's own pods hold
    # (the inventory gives those back as free), so what they hold is room whatever it says.
    room = room_for(kept, req.inventory, enough=replicas)
    if room < replicas:
        room = max(room, _bound_there(req.pods, req.revision, kept), ready_replicas(req.live))
    if room >= replicas:
        return None
    try:
        request = sizing_request(req.model, [e.key for e in excluded], req.weights, req.cpu_allowed)
    except sizing.SizingInputError:
        return None
    result = sizing.plan_placement(request, req.inventory)
    chosen = result.placement
    if chosen is None or chosen.key == kept.key or chosen.pods_with_room < replicas:
        return None
    placement = to_api_placement(chosen, result.profile, result.reasons)
    note = (f"serving.replicas is {replicas} and {kept.summary} has room for {room}; "
            f"moved to {placement.summary}, which has room for all of them")
    return PlacementDecision(placement, fallbacks=tuple(_fallback(f) for f in result.fallbacks), excluded=excluded,
                             events=(EventNote("Normal", "Placed", note),))


def _keep_placement(req: PlacementRequest) -> tuple[Placement | None, tuple[ExcludedPlacement, ...], str, float | None]:
    """The placement kept (None: size anew), the placements given up on, why the kept one was
    given up (if it was), and when its pods' Pending time runs out."""
    placement = req.old.placement if not req.resize else None
    if placement is None:
        return None, req.excluded, "", None
    serving_there = deployment_ready(req.live, None)
    if placement.key in {e.key for e in req.excluded}:
        # Given up on earlier, unless its pods got scheduled after all and are serving there.
        return (placement if serving_there else None), req.excluded, "", None
    pending = _pending_since(req.pods, req.revision, placement)
    if pending is not None:
        waited = (req.now - pending[0]).total_seconds()
        if waited < req.pending_timeout_seconds:
            return placement, req.excluded, "", req.pending_timeout_seconds - waited + 1
        moved = (f"pods stayed Pending for {int(waited)}s on {placement.summary} "
                 f"(limit {req.pending_timeout_seconds}s): {pending[1]}")
        return None, (*req.excluded, ExcludedPlacement(key=placement.key, reason=moved)), moved, None
    if not (room_for(placement, req.inventory, enough=1) or serving_there or _bound_there(req.pods, req.revision, placement)):
        return None, req.excluded, "", None
    return placement, req.excluded, "", None


def _bound_there(pods: Iterable[dict[str, Any]], revision: str, placement: Placement) -> int:
    """How many pods of the revision and placement are bound to a node: they hold their devices
    there. Such a placement is kept though the Deployment does not say Ready yet (its status comes
    after the pods', late on a busy control plane): what other models' unbound pods may take from
    the inventory meanwhile must not move a model off the devices it already has."""
    return sum(
        1 for pod in pods
        if ((pod.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL) == revision
        and ((pod.get("metadata") or {}).get("annotations") or {}).get(PLACEMENT_ANNOTATION) == placement.key
        and on_its_node(pod))


def _placed_events(req: PlacementRequest, placement: Placement, moved_reason: str, stuck: str) -> tuple[EventNote, ...]:
    old = req.old.placement
    if old is not None and old.key == placement.key and not req.resize:
        return ()
    if moved_reason:
        where = f"staying on {placement.summary}" if stuck else f"moved to {placement.summary}"
        return (EventNote("Warning", "PlacementFallback", f"{moved_reason}; {where}"),)
    if old is None or old.key != placement.key:
        first = f"revision {req.revision} " if req.old.revision is None else ""
        return (EventNote("Normal", "Placed", f"{first}{placement.summary}: " + "; ".join(placement.reasons[:2])),)
    return ()
