"""Sentences for people: why a placement was chosen, and what to change when nothing fits."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from slmfleet.sizing.fit import ModelFit, budget_bytes, round_context, tensor_parallel_problem
from slmfleet.sizing.inventory import DeviceClass, Inventory, NodeGpus
from slmfleet.sizing.memory import MemoryProfile, gib

if TYPE_CHECKING:
    from slmfleet.sizing.placement import Candidate, Placement, SizingRequest

# Below this a suggested context is not worth offering.
SMALLEST_USEFUL_CONTEXT = 256


def model_sentence(request: SizingRequest, profile: MemoryProfile) -> str:
    arch = request.architecture
    storage = profile.dtype + (f", {profile.quantization}" if profile.quantization else "")
    source = "exact, from safetensors" if profile.weights_exact else "estimated"
    return (
        f"{arch.model_type}: {profile.parameter_count / 1e9:.2f}B parameters; weights {gib(profile.weights_bytes)} GiB "
        f"({storage}, {source}); KV cache {profile.kv_bytes_per_token / 1024:g} KiB per token ({profile.kv_cache_dtype})."
    )


def target_reasons(request: SizingRequest, target: MemoryProfile) -> tuple[str, ...]:
    return (model_sentence(request, target), f"At the target settings it {target.describe()}.", *target.notes)


def placement_reasons(
    request: SizingRequest,
    fit: ModelFit,
    profile: MemoryProfile,
    placement: Placement,
    chosen: Candidate,
    ranked: list[Candidate],
    eligible: Iterable[NodeGpus],
) -> tuple[str, ...]:
    tp = placement.tensor_parallel_size
    per_device = f"; {gib(profile.per_device_bytes)} GiB on each device" if tp > 1 else ""
    if request.gpu_count:
        why = f"the requested {request.gpu_count} device(s)"
    elif tp == 1:
        why = "the smallest free device that fits"
    else:
        why = "the fewest devices that fit"
    reasons = [
        model_sentence(request, profile),
        f"It {profile.describe()}{per_device}.",
        f"Placed on {placement.gpu_count}× {placement.gpu_product} ({gib(placement.device_memory_bytes)} GiB each, "
        f"TP={tp}): {why}; {placement.nodes_with_capacity} node(s) have room.",
    ]
    skipped = _smaller_devices(chosen, ranked, eligible)
    if skipped:
        reasons.append(f"Smaller devices skipped: {'; '.join(skipped)}.")
    if placement.max_model_len < request.context_goal:
        reasons.append(
            f"max_model_len shortened from {request.context_goal} to {placement.max_model_len} tokens: "
            f"no free device holds {request.context_goal}."
        )
    share = fit.need(tp, placement.max_model_len) / placement.device_memory_bytes
    reasons.append(
        f"gpu-memory-utilization {placement.gpu_memory_utilization:.2f}: the model needs {share:.0%} of each device; "
        "vLLM fills the rest of that fraction with KV cache."
    )
    if request.excluded:
        reasons.append(f"Skipped after pods stayed Pending: {', '.join(sorted(request.excluded))}.")
    return (*reasons, *profile.notes)


def replicas_reason(replicas: int, pods_with_room: int) -> str:
    if pods_with_room >= replicas:
        return f"The free devices hold all {replicas} replicas ({pods_with_room} pods of this size)."
    return (f"The free devices hold {pods_with_room} of the {replicas} replicas, and no other placement "
            "that fits holds more of them; the others stay Pending until devices free up.")


def no_fit_message(
    request: SizingRequest,
    fit: ModelFit,
    target: MemoryProfile,
    inventory: Inventory,
    eligible: tuple[NodeGpus, ...],
    ranked: list[Candidate],
    blocker: str,
) -> str:
    parts = [target.describe()]
    if ranked:
        keys = ", ".join(sorted({c.key for c in ranked}))
        return "; ".join([*parts, f"every placement that fits ({keys}) was tried and its pods stayed Pending"])
    if blocker:
        parts.append(blocker)
        elsewhere = _smallest_fit(request, fit, eligible or inventory.nodes, min_tp=1)
        if elsewhere:
            tp, device = elsewhere
            where = "once they free up" if eligible else "without that constraint"
            parts.append(f"it would fit on {tp}× {device.product} {where}")
        return "; ".join(parts)

    cap = request.utilization_cap_hundredths
    largest = max((n.device for n in eligible if n.free), key=lambda d: (d.memory_bytes, d.product))
    budget = budget_bytes(largest.memory_bytes, cap)
    parts.append(f"largest free GPU {largest.product} gives {gib(budget)} GiB at {cap / 100:.2f}")
    tp = request.gpu_count or 1
    if request.gpu_count:
        problem = tensor_parallel_problem(request.architecture, tp, request.quantization)
        # MIG slices never join a tensor-parallel group, so only whole GPUs count for TP > 1.
        most_free = max((n.free for n in eligible if tp == 1 or not n.device.is_mig), default=0)
        if problem:
            parts.append(f"exact gpu count {tp} is not a usable tensor parallel size: {problem}")
        elif most_free < tp:
            parts.append(f"exact gpu count {tp}: no node has {tp} free matching devices")
    suggestions = _suggestions(request, fit, largest, tp, budget, eligible, inventory)
    if suggestions:
        parts.append("fits " + ", or ".join(suggestions))
    elif -(-fit.weights // tp) > budget:
        parts.append(f"the weights alone ({gib(fit.weights)} GiB) exceed it and no node offers enough devices for TP")
    else:
        parts.append("no free device here is large enough")
    return "; ".join(parts)


def _suggestions(
    request: SizingRequest,
    fit: ModelFit,
    largest: DeviceClass,
    tp: int,
    budget: int,
    eligible: tuple[NodeGpus, ...],
    inventory: Inventory,
) -> list[str]:
    out = []
    usable_tp = tensor_parallel_problem(request.architecture, tp, request.quantization) is None and (
        tp == 1 or not largest.is_mig
    )
    goal = request.context_goal
    if usable_tp:
        context = round_context(fit.max_context(tp, budget))
        if SMALLEST_USEFUL_CONTEXT <= context < goal:
            out.append(f"with max context {context}")
        seqs = fit.max_seqs(tp, goal, budget)
        if 1 <= seqs < request.concurrency:
            out.append(f"with {seqs} concurrent sequence{'s' if seqs > 1 else ''}")
        if request.kv_cache_dtype == "auto" and replace(fit, kv_cache_dtype="fp8").need(tp, goal) <= budget:
            out.append("with kv-cache-dtype fp8")
    any_count = replace(request, gpu_count=None)
    wider = _smallest_fit(any_count, fit, eligible, min_tp=1 if request.gpu_count else 2)
    if wider and wider[0] != request.gpu_count:
        n, device = wider
        most_free = max((e.free for e in eligible if e.device == device), default=0)
        busy = f" (no node has {n} free now)" if most_free < n else ""
        count = f" (gpu count {n})" if request.gpu_count else ""
        out.append(f"on {n}× {device.product} with TP={n}{count}{busy}")
    if not wider and (request.allowed_products or request.node_selector or not request.allow_mig):
        outside = _smallest_fit(any_count, fit, inventory.nodes, min_tp=1)
        if outside:
            n, device = outside
            out.append(f"on {n}× {device.product} with TP={n} outside the requested products/selector")
    return out


def _smallest_fit(
    request: SizingRequest, fit: ModelFit, nodes: Iterable[NodeGpus], min_tp: int
) -> tuple[int, DeviceClass] | None:
    """The fewest, smallest devices that hold the goal context if their nodes were empty."""
    per_node: dict[DeviceClass, int] = {}
    for n in nodes:
        per_node[n.device] = max(per_node.get(n.device, 0), n.allocatable)
    best: tuple[int, int, str, DeviceClass] | None = None
    for device, most in sorted(per_node.items()):
        budget = budget_bytes(device.memory_bytes, request.utilization_cap_hundredths)
        largest_tp = 1 if device.is_mig else most
        sizes = [request.gpu_count] if request.gpu_count else range(min_tp, largest_tp + 1)
        for tp in sizes:
            if tp > largest_tp or tensor_parallel_problem(request.architecture, tp, request.quantization):
                continue
            if fit.need(tp, request.context_goal) <= budget:
                if best is None or (tp, device.memory_bytes, device.product) < best[:3]:
                    best = (tp, device.memory_bytes, device.product, device)
                break
    return (best[0], best[3]) if best else None


def _smaller_devices(chosen: Candidate, ranked: list[Candidate], eligible: Iterable[NodeGpus]) -> list[str]:
    by_device: dict[DeviceClass, Candidate] = {}
    for r in ranked:
        by_device.setdefault(r.device, r)
    out = []
    for device in sorted({n.device for n in eligible if n.free}, key=lambda d: (d.memory_bytes, d.product)):
        if device.memory_bytes >= chosen.device.memory_bytes or device == chosen.device:
            continue
        c = by_device.get(device)
        size = f"{device.product} ({gib(device.memory_bytes)} GiB)"
        if c is None:
            out.append(f"{size} is too small")
        elif not c.reaches_goal and chosen.reaches_goal:
            out.append(f"{size} holds only {c.context} tokens")
    return out
