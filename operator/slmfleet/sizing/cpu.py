"""CPU placements: a model served by vLLM's CPU backend on a node without GPUs.

On a CPU node the memory is the node's, shared by its pods, so a CPU placement requests (and is
limited to) what vLLM will use, and fits where a node's free allocatable memory holds it:
- the weights at the CPU dtype: bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX,
  per Node Feature Discovery's labels), else float32, which vLLM's CPU backend runs at full speed
  everywhere; a dtype set in the spec is kept, and bfloat16 then needs such a CPU;
- the KV cache for maxModelLen × concurrency tokens, in whole GiB: vLLM's CPU backend allocates
  exactly `VLLM_CPU_KVCACHE_SPACE` GiB (without it, it would take a fraction of the host's RAM);
- the runtime: 4 GiB, measured (bench/results/real_vllm_smoke.json: 5.2 GiB RSS over vLLM's three
  processes with a 1 GiB KV cache and 0.26 GiB of weights), plus the activation and sampler
  estimate used on GPUs;
rounded up to 256 MiB. The context is chosen as on GPUs: the goal (maxModelLen, or the model's
maximum up to 32768), or a shorter one down to 2048 when maxModelLen is not set.

CPU nodes are the schedulable nodes that offer no NVIDIA device. Their free cores and memory are
allocatable less the requests of the pods the operator sees there. Cores are requested whole and
equal to the limit, so the pod is Guaranteed and a kubelet with the static CPU manager gives it
exclusive cores for vLLM's thread binding.

Quantized checkpoints and fp8 KV caches are GPU-only here: CPU placements are for 16- and 32-bit
checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from slmfleet.sizing.architecture import ModelArchitecture
from slmfleet.sizing.fit import round_context
from slmfleet.sizing.memory import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DTYPE_BYTES,
    GIB,
    MIB,
    MemoryProfile,
    Overhead,
    kv_bytes_per_token,
    weights_bytes,
)
from slmfleet.sizing.parameters import parameter_counts

CPU_RESOURCE = "cpu"
BF16_PRODUCT = "CPU-BF16"
PLAIN_PRODUCT = "CPU"
NFD_CPUID = "feature.node.kubernetes.io/cpu-cpuid."
BF16_FEATURES = ("AVX512BF16", "AMXBF16")
# A CPU placement's node selector for bfloat16: the first feature; nodes with AMX also report it.
BF16_SELECTOR = {NFD_CPUID + "AVX512BF16": "true"}
GPU_NODE_LABEL = "nvidia.com/gpu.product"  # a node with GPUs; CPU placements stay off them

CPU_RUNTIME_BYTES = 4 * GIB
MEMORY_STEP = 256 * MIB
DEFAULT_CPU_CORES = 4
CPU_UTILIZATION = 0.90  # passed as --gpu-memory-utilization; the CPU backend sizes by VLLM_CPU_KVCACHE_SPACE


@dataclass(frozen=True)
class CpuNode:
    node_name: str
    labels: Mapping[str, str] = field(compare=True, hash=False)
    bf16: bool
    allocatable_millicores: int
    allocatable_memory: int
    free_millicores: int
    free_memory: int


@dataclass(frozen=True)
class CpuChoice:
    """One CPU placement: where, at which settings, and what it needs."""

    product: str
    cores: int
    dtype: str
    context: int
    kv_cache_gib: int
    memory_bytes: int  # the pod's request and limit
    node_memory_bytes: int  # the smallest allocatable memory among the class's nodes
    node_selector: Mapping[str, str] = field(hash=False)
    nodes_with_capacity: int
    reaches_goal: bool
    profile: MemoryProfile = field(hash=False, compare=False)
    pods_with_room: int = 1  # pods of this size the class's free cores and memory hold

    @property
    def key(self) -> str:
        return f"{CPU_RESOURCE}|{self.product}|{self.cores}"


def has_bf16(labels: Mapping[str, str]) -> bool:
    return any(labels.get(NFD_CPUID + f) == "true" for f in BF16_FEATURES)


def cpu_nodes_from(nodes: Iterable[Mapping[str, Any]], used: Mapping[str, Mapping[str, int]]) -> tuple[CpuNode, ...]:
    """The CPU nodes among `nodes` (already filtered to schedulable ones), `used` being the cpu
    (millicores) and memory (bytes) requested by pods on each node."""
    found = (cpu_node_of(node, used.get(str((node.get("metadata") or {}).get("name", "")), {})) for node in nodes)
    return tuple(sorted((n for n in found if n is not None), key=lambda n: n.node_name))


def cpu_node_of(node: Mapping[str, Any], used: Mapping[str, int]) -> CpuNode | None:
    """The node as a CPU node (None if it offers NVIDIA devices or no cores or memory), `used`
    being the cpu (millicores) and memory (bytes) its pods request."""
    meta = node.get("metadata") or {}
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    if any(str(r).startswith("nvidia.com/") and quantity(v) > 0 for r, v in allocatable.items()):
        return None
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    millicores, memory = millicores_of(allocatable.get("cpu")), quantity(allocatable.get("memory"))
    if millicores <= 0 or memory <= 0:
        return None
    return CpuNode(str(meta.get("name", "")), labels, has_bf16(labels), millicores, memory,
                   max(0, millicores - used.get("cpu", 0)), max(0, memory - used.get("memory", 0)))


def cpu_dtype(arch: ModelArchitecture, requested: str, bf16: bool) -> str | None:
    """The dtype a CPU of this kind serves at, or None when it cannot serve the requested one."""
    if requested == "auto":
        return "bfloat16" if bf16 and arch.torch_dtype != "float32" else "float32"
    if requested == "bfloat16":
        return "bfloat16" if bf16 else None
    return "float32" if requested == "float32" else None  # float16: no native CPU path in vLLM


def cpu_problem(arch: ModelArchitecture, quantization: str | None, kv_cache_dtype: str, dtype: str) -> str:
    """Why the model cannot run on vLLM's CPU backend at all ("" when it can)."""
    if quantization is not None or arch.quantization is not None:
        return "quantized checkpoints are served on GPUs only"
    if kv_cache_dtype != "auto":
        return f"kvCacheDtype {kv_cache_dtype} is served on GPUs only"
    if dtype == "float16":
        return "dtype float16 has no native path on CPUs; use bfloat16 or float32"
    return ""


@dataclass(frozen=True)
class CpuSizing:
    """The model's memory need on a CPU at one dtype, answered with integer arithmetic."""

    arch: ModelArchitecture
    dtype: str
    max_num_seqs: int
    exact_weights_bytes: int | None = None

    @cached_property
    def weights(self) -> int:
        return weights_bytes(self.arch, self.dtype, None, self.exact_weights_bytes)

    @cached_property
    def kv_per_token(self) -> int:
        return kv_bytes_per_token(self.arch, "auto", self.dtype)

    @cached_property
    def overhead(self) -> Overhead:
        width = self.arch.hidden_size + self.arch.intermediate_size
        batched = max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_num_seqs)
        return Overhead(
            runtime_bytes=CPU_RUNTIME_BYTES,
            activation_bytes=4 * batched * width * DTYPE_BYTES[self.dtype],
            logits_bytes=2 * self.arch.vocab_size * self.max_num_seqs * 4,
            cuda_graph_bytes=0,
        )

    def kv_gib(self, context: int) -> int:
        return max(1, -(-self.kv_per_token * context * self.max_num_seqs // GIB))

    def memory(self, context: int) -> int:
        return _round_up(self.weights + self.kv_gib(context) * GIB + self.overhead.total_bytes)

    def longest_context(self, free_memory: int) -> int:
        """The longest context (tokens) whose whole-GiB KV cache fits `free_memory` with the rest; 0 if none."""
        base = self.weights + self.overhead.total_bytes
        gib = (free_memory - base) // GIB
        while gib >= 1 and _round_up(base + gib * GIB) > free_memory:
            gib -= 1
        return 0 if gib < 1 else gib * GIB // (self.kv_per_token * self.max_num_seqs)

    def profile(self, context: int) -> MemoryProfile:
        kv = self.kv_gib(context) * GIB
        overhead = self.overhead
        return MemoryProfile(
            parameter_count=parameter_counts(self.arch).total,
            weights_bytes=self.weights,
            weights_exact=self.exact_weights_bytes is not None,
            kv_bytes_per_token=self.kv_per_token,
            kv_cache_bytes=kv,
            overhead_bytes=overhead.total_bytes,
            total_bytes=self.weights + kv + overhead.total_bytes,
            per_device_bytes=self.weights + kv + overhead.total_bytes,
            max_model_len=context,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_num_seqs),
            tensor_parallel_size=1,
            dtype=self.dtype,
            kv_cache_dtype="auto",
            quantization=None,
            overhead=overhead,
            notes=self.arch.notes,
        )


def rank_cpu_choices(
    arch: ModelArchitecture,
    nodes: Iterable[CpuNode],
    *,
    dtype: str,
    concurrency: int,
    context_goal: int,
    context_floor: int,
    cores: int | None,
    node_selector: Mapping[str, str],
    exact_weights_bytes: int | None = None,
    replicas: int = 1,
) -> list[CpuChoice]:
    """One choice per CPU class (bfloat16-capable, any), best first: room for `replicas` pods,
    then reaches the context goal, then bfloat16 (half the memory and several times faster), then fewer cores."""
    matching = [n for n in nodes if all(n.labels.get(k) == v for k, v in node_selector.items())]
    # bfloat16 needs the nodes that compute it natively; float32 runs on any CPU node.
    classes = [(BF16_PRODUCT, [n for n in matching if n.bf16], cpu_dtype(arch, dtype, True), BF16_SELECTOR),
               (PLAIN_PRODUCT, matching, cpu_dtype(arch, dtype, False), {})]
    choices = []
    for product, members, served, class_selector in classes:
        if not members or served is None or (product == BF16_PRODUCT and served != "bfloat16"):
            continue
        sizing = CpuSizing(arch, served, concurrency, exact_weights_bytes)
        want = cores or _default_cores(members)
        roomy = [n for n in members if n.free_millicores >= want * 1000]
        longest = max((sizing.longest_context(n.free_memory) for n in roomy), default=0)
        context = context_goal if longest >= context_goal else round_context(longest)
        if context < context_floor or context <= 0:
            continue
        memory = sizing.memory(context)
        choices.append(CpuChoice(
            product=product, cores=want, dtype=served, context=context,
            kv_cache_gib=sizing.kv_gib(context), memory_bytes=memory,
            node_memory_bytes=min(n.allocatable_memory for n in members),
            node_selector={**node_selector, **class_selector},
            nodes_with_capacity=sum(n.free_memory >= memory for n in roomy),
            reaches_goal=context >= context_goal, profile=sizing.profile(context),
            pods_with_room=sum(min(n.free_millicores // (want * 1000), n.free_memory // memory) for n in roomy)))
    return sorted(choices, key=lambda c: (c.pods_with_room < replicas, not c.reaches_goal,
                                          c.dtype != "bfloat16", c.cores, c.memory_bytes))


def cpu_no_fit(arch: ModelArchitecture, nodes: tuple[CpuNode, ...], *, dtype: str, concurrency: int,
               context_floor: int, cores: int | None, node_selector: Mapping[str, str],
               exact_weights_bytes: int | None = None) -> str:
    """One line on why no CPU node takes the model."""
    if not nodes:
        return "no schedulable CPU node (a node without GPUs) is in the cluster"
    matching = [n for n in nodes if all(n.labels.get(k) == v for k, v in node_selector.items())]
    if not matching:
        return f"node selector {_labels(node_selector)} matches no CPU node"
    if dtype == "bfloat16" and not any(n.bf16 for n in matching):
        return "dtype bfloat16 needs a CPU with AVX512-BF16 or AMX, and no CPU node has one"
    served = cpu_dtype(arch, dtype, any(n.bf16 for n in matching)) or "float32"
    sizing = CpuSizing(arch, served, concurrency, exact_weights_bytes)
    want = cores or _default_cores(matching)
    need = sizing.memory(context_floor)
    most_cores = max(n.free_millicores for n in matching) // 1000
    most_memory = max(n.free_memory for n in matching)
    if most_cores < want:
        return f"no CPU node has {want} free cores (most free: {most_cores})"
    return (f"needs {need / GIB:.1f} GiB at {served} for {context_floor} tokens × {concurrency} sequences "
            f"(weights {sizing.weights / GIB:.2f} + KV {sizing.kv_gib(context_floor)} + runtime "
            f"{sizing.overhead.total_bytes / GIB:.1f}); the most free on a CPU node is {most_memory / GIB:.1f} GiB")


def cpu_reasons(choice: CpuChoice, concurrency: int) -> list[str]:
    why_dtype = ("the CPU computes bfloat16 natively (AVX512-BF16/AMX)" if choice.dtype == "bfloat16"
                 else "float32: the CPU has no native bfloat16" if choice.product == PLAIN_PRODUCT else "")
    return [
        f"vLLM CPU backend on {choice.cores} cores, {choice.dtype}" + (f" ({why_dtype})" if why_dtype else ""),
        f"memory {choice.memory_bytes / GIB:.2f} GiB = weights {choice.profile.weights_bytes / GIB:.2f} + KV cache "
        f"{choice.kv_cache_gib} GiB (VLLM_CPU_KVCACHE_SPACE) for {choice.context} tokens × {concurrency} sequences "
        f"+ runtime {choice.profile.overhead_bytes / GIB:.2f}",
        f"{choice.nodes_with_capacity} CPU node(s) have the cores and memory free",
    ]


def quantity(value: Any) -> int:
    """A Kubernetes quantity as a whole number ("8Gi", "512Mi", "2", "1500m" -> 1); 0 if unreadable."""
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return max(0, value)
    text = str(value).strip()
    for suffix, scale in _SUFFIXES:
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            try:
                return max(0, int(float(number) * scale))
            except ValueError:
                return 0
    try:
        return max(0, int(float(text)))
    except ValueError:
        return 0


def millicores_of(value: Any) -> int:
    if isinstance(value, str) and value.strip().endswith("m"):
        try:
            return max(0, int(value.strip()[:-1]))
        except ValueError:
            return 0
    if isinstance(value, str):
        try:
            return max(0, int(float(value.strip()) * 1000))
        except ValueError:
            return 0
    return quantity(value) * 1000


_SUFFIXES = (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40), ("Pi", 2**50), ("Ei", 2**60),
             ("k", 10**3), ("M", 10**6), ("G", 10**9), ("T", 10**12), ("P", 10**15), ("E", 10**18),
             ("m", 0.001))


def _default_cores(nodes: Iterable[CpuNode]) -> int:
    """DEFAULT_CPU_CORES, or fewer where no node has that many free (at least one)."""
    return max(1, min(DEFAULT_CPU_CORES, max(n.free_millicores // 1000 for n in nodes)))


def container_cpu_memory(container: Mapping[str, Any]) -> dict[str, int]:
    """A container's cpu (millicores) and memory (bytes) requests; a limit alone implies the request."""
    resources = container.get("resources") or {}
    merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {"cpu": millicores_of(merged.get("cpu", 0)), "memory": quantity(merged.get("memory", 0))}


def _round_up(size: int) -> int:
    return -(-size // MEMORY_STEP) * MEMORY_STEP


def _labels(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
