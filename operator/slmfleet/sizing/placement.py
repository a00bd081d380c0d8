"""Choose where a model runs: which device, how many, and the vLLM settings that make it fit.

Candidates are (device class, tensor parallel size) pairs that fit on ONE node's free devices.
They rank by: reaches the context goal first, then fewest devices, then least memory per device,
then product name, so a 0.5B model lands on a MIG slice or an L4 rather than a whole H100.

`gpu_memory_utilization` is the need per device over the device's memory plus a 0.02 margin,
rounded up to hundredths, never below 0.90 and never above the request's cap (0.95 by default).
The floor is vLLM's own default: the device is dedicated to the pod by the device plugin, so
memory left below it would sit idle instead of holding more KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from math import floor
from typing import Any

from slmfleet.sizing import cpu, explain
from slmfleet.sizing.architecture import ModelArchitecture, SizingInputError
from slmfleet.sizing.fit import ModelFit, budget_bytes, round_context, tensor_parallel_problem
from slmfleet.sizing.inventory import DeviceClass, Inventory, NodeGpus
from slmfleet.sizing.memory import KV_CACHE_DTYPES, QUANTIZATIONS, SERVING_DTYPES, MemoryProfile

DEFAULT_CONCURRENCY = 8
CONTEXT_GOAL = 32_768  # what a flexible max_model_len aims for
CONTEXT_FLOOR = 2_048  # and the least it settles for
UTILIZATION_FLOOR_HUNDREDTHS = 90
UTILIZATION_MARGIN_HUNDREDTHS = 2
MAX_FALLBACKS = 4
ACCELERATORS = ("gpu", "cpu", "auto")


@dataclass(frozen=True)
class SizingRequest:
    architecture: ModelArchitecture
    dtype: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None  # None: flexible, see CONTEXT_GOAL and CONTEXT_FLOOR
    concurrency: int = DEFAULT_CONCURRENCY
    allowed_products: tuple[str, ...] = ()  # products or resource names; empty: any
    gpu_count: int | None = None  # exact; None: choose
    allow_mig: bool = True
    max_gpu_memory_utilization: float = 0.95
    node_selector: Mapping[str, str] = field(default_factory=dict, hash=False)
    exact_weights_bytes: int | None = None
    excluded: frozenset[str] = frozenset()  # placement keys whose pods stayed Pending
    accelerator: str = "gpu"  # gpu, cpu, or auto (GPUs first, CPU nodes when none fits)
    cpu_cores: int | None = None  # on a CPU placement; None: cpu.DEFAULT_CPU_CORES or what the nodes have
    replicas: int = 1  # pods to find room for: a class with room for all of them ranks first

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_products", tuple(sorted(set(self.allowed_products))))
        object.__setattr__(self, "excluded", frozenset(self.excluded))
        object.__setattr__(self, "node_selector", dict(sorted(dict(self.node_selector).items())))
        if self.dtype not in SERVING_DTYPES:
            raise SizingInputError(f"dtype {self.dtype!r} is not one of {', '.join(SERVING_DTYPES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise SizingInputError(f"quantization {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise SizingInputError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        if self.concurrency < 1:
            raise SizingInputError(f"concurrency must be at least 1, not {self.concurrency}")
        if self.gpu_count is not None and self.gpu_count < 1:
            raise SizingInputError(f"gpu_count must be at least 1, not {self.gpu_count}")
        if not 0.01 <= self.max_gpu_memory_utilization <= 1:
            raise SizingInputError(f"max_gpu_memory_utilization must be within 0.01..1, not {self.max_gpu_memory_utilization}")
        if self.accelerator not in ACCELERATORS:
            raise SizingInputError(f"accelerator {self.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
        if self.replicas < 1:
            raise SizingInputError(f"replicas must be at least 1, not {self.replicas}")
        if self.cpu_cores is not None and self.cpu_cores < 1:
            raise SizingInputError(f"cpu_cores must be at least 1, not {self.cpu_cores}")
        model_max = self.architecture.max_position_embeddings
        if self.max_model_len is not None and not 1 <= self.max_model_len <= model_max:
            raise SizingInputError(f"max_model_len {self.max_model_len} is outside 1..{model_max}, the model's maximum")

    @property
    def context_goal(self) -> int:
        if self.max_model_len is not None:
            return self.max_model_len
        return min(self.architecture.max_position_embeddings, CONTEXT_GOAL)

    @property
    def context_floor(self) -> int:
        return self.context_goal if self.max_model_len is not None else min(self.context_goal, CONTEXT_FLOOR)

    @property
    def utilization_cap_hundredths(self) -> int:
        return floor(self.max_gpu_memory_utilization * 100 + 1e-9)


@dataclass(frozen=True)
class Placement:
    gpu_resource: str
    gpu_product: str
    gpu_count: int
    tensor_parallel_size: int
    device_memory_bytes: int
    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    node_selector: Mapping[str, str] = field(hash=False)
    nodes_with_capacity: int
    is_mig: bool
    # A CPU placement: gpu_resource is "cpu", gpu_product the CPU class, gpu_count the cores.
    accelerator: str = "gpu"
    memory_bytes: int = 0  # the pod's memory request and limit (CPU)
    kv_cache_gib: int = 0  # VLLM_CPU_KVCACHE_SPACE (CPU)
    dtype: str = ""  # the --dtype the placement serves at, when it decides it (CPU)
    pods_with_room: int = 1  # pods of this size the free devices (or cores and memory) hold

    @property
    def key(self) -> str:
        return placement_key(self.gpu_resource, self.gpu_product, self.gpu_count)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "gpu_resource": self.gpu_resource,
            "gpu_product": self.gpu_product,
            "gpu_count": self.gpu_count,
            "tensor_parallel_size": self.tensor_parallel_size,
            "device_memory_bytes": self.device_memory_bytes,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "node_selector": dict(self.node_selector),
            "nodes_with_capacity": self.nodes_with_capacity,
            "is_mig": self.is_mig,
            "accelerator": self.accelerator,
            "memory_bytes": self.memory_bytes,
            "kv_cache_gib": self.kv_cache_gib,
            "dtype": self.dtype,
            "pods_with_room": self.pods_with_room,
        }


PLACEMENT_KEYS = tuple(Placement.__dataclass_fields__)


@dataclass(frozen=True)
class SizingResult:
    profile: MemoryProfile  # at the chosen settings, or the target ones when nothing fits
    placement: Placement | None
    fallbacks: tuple[Placement, ...] = ()
    reasons: tuple[str, ...] = ()
    message: str = ""  # one actionable line when nothing fits

    def to_dict(self) -> dict[str, Any]:
        """Flat for scripts: the profile's figures, the placement's fields (None when nothing fits)."""
        placement = self.placement.to_dict() if self.placement else None
        out: dict[str, Any] = {
            "weights_bytes": self.profile.weights_bytes,
            "kv_bytes_per_token": self.profile.kv_bytes_per_token,
            "kv_cache_bytes": self.profile.kv_cache_bytes,
            "overhead_bytes": self.profile.overhead_bytes,
            "total_bytes": self.profile.total_bytes,
            "parameter_count": self.profile.parameter_count,
        }
        out |= {k: (placement or {}).get(k) for k in ("key", *PLACEMENT_KEYS)}
        out |= {
            "profile": self.profile.to_dict(),
            "placement": placement,
            "fallbacks": [f.to_dict() for f in self.fallbacks],
            "reasons": list(self.reasons),
            "message": self.message,
        }
        return out


def placement_key(resource: str, product: str, count: int) -> str:
    return f"{resource}|{product}|{count}"


@dataclass(frozen=True)
class Candidate:
    device: DeviceClass
    tp: int
    context: int
    reaches_goal: bool
    nodes_with_capacity: int
    pods_with_room: int = 1
    replicas_short: bool = False  # the free devices hold fewer pods than the request's replicas

    @property
    def rank(self) -> tuple[Any, ...]:
        # Room for every replica first: a class that holds one pod of two leaves the other Pending
        # until pendingTimeoutSeconds moves the model anyway.
        return (self.replicas_short, not self.reaches_goal, self.tp,
                self.device.memory_bytes, self.device.product, self.device.resource)

    @property
    def key(self) -> str:
        return placement_key(self.device.resource, self.device.product, self.tp)


def plan_placement(request: SizingRequest, inventory: Inventory) -> SizingResult:
    """GPU placements ranked first (unless the request is CPU-only), then CPU ones (if it allows them)."""
    fit = model_fit(request)
    gpu_allowed, cpu_allowed = request.accelerator != "cpu", request.accelerator != "gpu"
    eligible, blocker = eligible_nodes(request, inventory) if gpu_allowed else ((), "")
    ranked = rank_candidates(request, fit, eligible) if gpu_allowed else []
    gpus = _one_per_device_class([c for c in ranked if c.key not in request.excluded])
    cpus = [c for c in _cpu_choices(request, inventory) if c.key not in request.excluded] if cpu_allowed else []
    if not gpus and not cpus:
        target = fit.profile(_target_tp(request), request.context_goal)
        messages = []
        if gpu_allowed:
            messages.append(explain.no_fit_message(request, fit, target, inventory, eligible, ranked, blocker))
        if cpu_allowed:
            messages.append("CPU: " + _cpu_no_fit(request, inventory))
        return SizingResult(target, None, (), explain.target_reasons(request, target), "; ".join(messages))

    placements = [_placement(request, fit, c) for c in gpus] + [_cpu_placement(request, c) for c in cpus]
    chosen, *fallbacks = placements
    if gpus:
        profile = fit.profile(gpus[0].tp, gpus[0].context)
        reasons = explain.placement_reasons(request, fit, profile, chosen, gpus[0], ranked, eligible)
    else:
        profile, reasons = cpus[0].profile, tuple(cpu.cpu_reasons(cpus[0], request.concurrency))
        if request.accelerator == "auto":
            reasons = (f"no GPU placement fits: {_gpu_no_fit(request, fit, inventory, eligible, ranked, blocker)}",
                       *reasons)
    if request.replicas > 1:
        reasons = (*reasons, explain.replicas_reason(request.replicas, chosen.pods_with_room))
    return SizingResult(profile, chosen, tuple(fallbacks[:MAX_FALLBACKS]), tuple(reasons), "")


def _cpu_choices(request: SizingRequest, inventory: Inventory) -> list[cpu.CpuChoice]:
    arch = request.architecture
    if cpu.cpu_problem(arch, request.quantization, request.kv_cache_dtype, request.dtype):
        return []
    return cpu.rank_cpu_choices(
        arch, inventory.cpu_nodes, dtype=request.dtype, concurrency=request.concurrency,
        context_goal=request.context_goal, context_floor=request.context_floor, cores=request.cpu_cores,
        node_selector=request.node_selector, exact_weights_bytes=request.exact_weights_bytes,
        replicas=request.replicas)


def _cpu_no_fit(request: SizingRequest, inventory: Inventory) -> str:
    arch = request.architecture
    if problem := cpu.cpu_problem(arch, request.quantization, request.kv_cache_dtype, request.dtype):
        return problem
    if any(k.startswith(f"{cpu.CPU_RESOURCE}|") for k in request.excluded):
        return "pods stayed Pending on the CPU placements that fit"
    return cpu.cpu_no_fit(arch, inventory.cpu_nodes, dtype=request.dtype, concurrency=request.concurrency,
                          context_floor=request.context_floor, cores=request.cpu_cores,
                          node_selector=request.node_selector, exact_weights_bytes=request.exact_weights_bytes)


def _gpu_no_fit(request: SizingRequest, fit: ModelFit, inventory: Inventory, eligible: tuple[NodeGpus, ...],
                ranked: list[Candidate], blocker: str) -> str:
    target = fit.profile(_target_tp(request), request.context_goal)
    return explain.no_fit_message(request, fit, target, inventory, eligible, ranked, blocker)


def _cpu_placement(request: SizingRequest, c: cpu.CpuChoice) -> Placement:
    return Placement(
        gpu_resource=cpu.CPU_RESOURCE,
        gpu_product=c.product,
        gpu_count=c.cores,
        tensor_parallel_size=1,
        device_memory_bytes=c.node_memory_bytes,
        gpu_memory_utilization=cpu.CPU_UTILIZATION,
        max_model_len=c.context,
        max_num_seqs=request.concurrency,
        max_num_batched_tokens=c.profile.max_num_batched_tokens,
        node_selector=dict(c.node_selector),
        nodes_with_capacity=c.nodes_with_capacity,
        is_mig=False,
        accelerator="cpu",
        memory_bytes=c.memory_bytes,
        kv_cache_gib=c.kv_cache_gib,
        dtype=c.dtype,
        pods_with_room=c.pods_with_room,
    )


def target_profile(request: SizingRequest) -> MemoryProfile:
    """The memory figures at the requested settings, before any device is considered."""
    return model_fit(request).profile(_target_tp(request), request.context_goal)


def target_result(request: SizingRequest) -> SizingResult:
    """A result with the figures only, for when there is no inventory to place on."""
    profile = target_profile(request)
    return SizingResult(profile, None, (), explain.target_reasons(request, profile), "")


def model_fit(request: SizingRequest) -> ModelFit:
    return ModelFit(
        request.architecture,
        max_num_seqs=request.concurrency,
        dtype=request.dtype,
        quantization=request.quantization,
        kv_cache_dtype=request.kv_cache_dtype,
        exact_weights_bytes=request.exact_weights_bytes,
    )


def eligible_nodes(request: SizingRequest, inventory: Inventory) -> tuple[tuple[NodeGpus, ...], str]:
    """The node entries every hard constraint allows, and, when none is left, which one emptied the list."""
    nodes = inventory.nodes
    if not nodes:
        return (), "the inventory has no schedulable GPU nodes"
    offered = ", ".join(sorted({n.device.product for n in nodes}))
    steps: list[tuple[str, Callable[[NodeGpus], bool]]] = []
    if request.node_selector:
        selector = request.node_selector
        steps.append((f"node selector {_labels(selector)} matches no GPU node",
                      lambda n: all(n.labels.get(k) == v for k, v in selector.items())))
    if not request.allow_mig:
        steps.append(("MIG slices are not allowed and no whole GPU is offered", lambda n: not n.device.is_mig))
    if request.allowed_products:
        allowed = set(request.allowed_products)
        steps.append((f"allowed products {', '.join(request.allowed_products)} match none of the GPUs ({offered})",
                      lambda n: n.device.product in allowed or n.device.resource in allowed))
    for blocker, keep in steps:
        nodes = tuple(n for n in nodes if keep(n))
        if not nodes:
            return (), blocker
    if not any(n.free for n in nodes):
        total = sum(n.allocatable for n in nodes)
        return nodes, f"no free GPUs: all {total} matching devices are allocated"
    return nodes, ""


def rank_candidates(request: SizingRequest, fit: ModelFit, nodes: Iterable[NodeGpus]) -> list[Candidate]:
    free_by_class: dict[DeviceClass, list[int]] = {}
    for n in nodes:
        free_by_class.setdefault(n.device, []).append(n.free)
    candidates = []
    for device, free in sorted(free_by_class.items()):
        for tp in tensor_parallel_sizes(request, device, max(free)):
            context = fitting_context(request, fit, device, tp)
            if context:
                pods = sum(f // tp for f in free)
                candidates.append(Candidate(device, tp, context, context >= request.context_goal,
                                            sum(f >= tp for f in free), pods, pods < request.replicas))
    return sorted(candidates, key=lambda c: c.rank)


def tensor_parallel_sizes(request: SizingRequest, device: DeviceClass, most_free_on_a_node: int) -> list[int]:
    # A process sees one MIG device, so a slice never joins a tensor-parallel group; and a class
    # with no free slice offers none (a full MIG class used to rank first, being the smallest).
    largest = min(1, most_free_on_a_node) if device.is_mig else most_free_on_a_node
    sizes = [request.gpu_count] if request.gpu_count else range(1, largest + 1)
    return [
        tp for tp in sizes
        if tp <= largest and tensor_parallel_problem(request.architecture, tp, request.quantization) is None
    ]


def fitting_context(request: SizingRequest, fit: ModelFit, device: DeviceClass, tp: int) -> int:
    """The context this device and TP can serve: the goal, a shortened one when allowed, or 0."""
    budget = budget_bytes(device.memory_bytes, request.utilization_cap_hundredths)
    longest = fit.max_context(tp, budget)
    if longest >= request.context_goal:
        return request.context_goal
    shortened = round_context(longest)
    return shortened if shortened >= request.context_floor else 0


def utilization_hundredths(need: int, device_memory_bytes: int, cap_hundredths: int) -> int:
    required = -(-need * 100 // device_memory_bytes)
    wanted = max(min(UTILIZATION_FLOOR_HUNDREDTHS, cap_hundredths), required + UTILIZATION_MARGIN_HUNDREDTHS)
    return min(cap_hundredths, wanted)


def _placement(request: SizingRequest, fit: ModelFit, c: Candidate) -> Placement:
    need = fit.need(c.tp, c.context)
    return Placement(
        gpu_resource=c.device.resource,
        gpu_product=c.device.product,
        gpu_count=c.tp,
        tensor_parallel_size=c.tp,
        device_memory_bytes=c.device.memory_bytes,
        gpu_memory_utilization=utilization_hundredths(need, c.device.memory_bytes, request.utilization_cap_hundredths) / 100,
        max_model_len=c.context,
        max_num_seqs=request.concurrency,
        max_num_batched_tokens=fit.max_num_batched_tokens,
        node_selector={**request.node_selector, c.device.product_label: c.device.product},
        nodes_with_capacity=c.nodes_with_capacity,
        is_mig=c.device.is_mig,
        pods_with_room=c.pods_with_room,
    )


def _target_tp(request: SizingRequest) -> int:
    tp = request.gpu_count or 1
    return tp if tensor_parallel_problem(request.architecture, tp, request.quantization) is None else 1


def _one_per_device_class(ranked: list[Candidate]) -> list[Candidate]:
    # If pods stay Pending on one count of a device, another count of the same device will too,
    # so fallbacks move to other devices.
    seen: set[tuple[str, str]] = set()
    out = []
    for c in ranked:
        if (c.device.resource, c.device.product) not in seen:
            seen.add((c.device.resource, c.device.product))
            out.append(c)
    return out


def _labels(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
