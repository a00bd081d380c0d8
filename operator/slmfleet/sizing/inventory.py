"""The cluster's GPUs: what each schedulable node offers and how much of it is still free.

Read from NVIDIA GPU Feature Discovery labels and the device plugin's allocatable resources:
whole GPUs are `nvidia.com/gpu` (product and memory in `nvidia.com/gpu.product` and
`nvidia.com/gpu.memory`, MiB); under the MIG "mixed" strategy each slice profile is its own
resource `nvidia.com/mig-<profile>` described by `nvidia.com/mig-<profile>.{product,memory}`.
Under the "single" strategy slices are advertised as `nvidia.com/gpu` with a `-MIG-` product.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from slmfleet.sizing.cpu import CpuNode, container_cpu_memory, cpu_nodes_from
from slmfleet.sizing.memory import MIB

GPU_RESOURCE = "nvidia.com/gpu"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"
MIG_STRATEGY_LABEL = "nvidia.com/mig.strategy"
_FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True, order=True)
class DeviceClass:
    """One kind of schedulable device: a whole GPU model or a MIG slice profile."""

    resource: str
    product: str
    memory_bytes: int
    is_mig: bool

    @property
    def product_label(self) -> str:
        """The node label that names this product, for node selectors."""
        if self.resource.startswith(MIG_RESOURCE_PREFIX):
            return f"{self.resource}.product"
        return PRODUCT_LABEL


@dataclass(frozen=True)
class NodeGpus:
    node_name: str
    labels: Mapping[str, str] = field(compare=True, hash=False)
    device: DeviceClass
    allocatable: int
    free: int


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[NodeGpus, ...] = ()
    cpu_nodes: tuple[CpuNode, ...] = ()  # nodes without GPUs, for vLLM's CPU backend

    def device_classes(self) -> tuple[DeviceClass, ...]:
        return tuple(sorted({n.device for n in self.nodes}))

    def matching(self, selector: Mapping[str, str]) -> Inventory:
        """Only the nodes whose labels carry every key/value of `selector`."""
        def matches(labels: Mapping[str, str]) -> bool:
            return all(labels.get(k) == v for k, v in selector.items())
        return Inventory(tuple(n for n in self.nodes if matches(n.labels)),
                         tuple(n for n in self.cpu_nodes if matches(n.labels)))


def inventory_from_nodes(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    exclude_pods: Callable[[Mapping[str, Any]], bool] | None = None,
) -> Inventory:
    counted = [p for p in pods if _counts(p, exclude_pods)]
    used = _requested_by_node(counted, None)
    schedulable = [node for node in nodes if _schedulable(node)]
    entries = []
    for node in schedulable:
        name = str((node.get("metadata") or {}).get("name", ""))
        labels = {str(k): str(v) for k, v in ((node.get("metadata") or {}).get("labels") or {}).items()}
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        for device, count in _devices(labels, allocatable):
            free = max(0, count - used[name].get(device.resource, 0))
            entries.append(NodeGpus(name, labels, device, count, free))
    entries = _smallest_memory_per_product(entries)
    entries.sort(key=lambda n: (n.node_name, n.device))
    cpu_used: defaultdict[str, dict[str, int]] = defaultdict(lambda: {"cpu": 0, "memory": 0})
    for pod in counted:
        node_name = str((pod.get("spec") or {}).get("nodeName"))
        for resource, amount in pod_requests(pod, container_cpu_memory).items():
            cpu_used[node_name][resource] += amount
    return Inventory(tuple(entries), cpu_nodes_from(schedulable, cpu_used))


def _counts(pod: Mapping[str, Any], exclude: Callable[[Mapping[str, Any]], bool] | None) -> bool:
    """A pod that holds its node's resources: bound, not finished, not excluded."""
    if not (pod.get("spec") or {}).get("nodeName") or (pod.get("status") or {}).get("phase") in _FINISHED_PHASES:
        return False
    return exclude is None or not exclude(pod)


def _smallest_memory_per_product(entries: list[NodeGpus]) -> list[NodeGpus]:
    # A placement selects nodes by resource and product only, so if nodes disagree about one
    # product's memory, the pod may land on the smallest: size for that one.
    smallest: dict[tuple[str, str], int] = {}
    for n in entries:
        key = (n.device.resource, n.device.product)
        smallest[key] = min(smallest.get(key, n.device.memory_bytes), n.device.memory_bytes)
    return [
        replace(n, device=replace(n.device, memory_bytes=smallest[(n.device.resource, n.device.product)]))
        for n in entries
    ]


def _devices(labels: Mapping[str, str], allocatable: Mapping[str, Any]) -> list[tuple[DeviceClass, int]]:
    out = []
    product = labels.get(PRODUCT_LABEL)
    whole = _count(allocatable.get(GPU_RESOURCE))
    memory_mib = _count(labels.get(MEMORY_LABEL))
    if product and whole > 0 and memory_mib > 0:
        single_mig = labels.get(MIG_STRATEGY_LABEL) == "single" or "-MIG-" in product
        out.append((DeviceClass(GPU_RESOURCE, product, memory_mib * MIB, single_mig), whole))
    for resource in sorted(allocatable):
        if not resource.startswith(MIG_RESOURCE_PREFIX):
            continue
        slices = _count(allocatable[resource])
        slice_mib = _count(labels.get(f"{resource}.memory"))
        if slices <= 0 or slice_mib <= 0:
            continue  # without GFD's memory label the slice cannot be sized, so it is not offered
        profile = resource.removeprefix(MIG_RESOURCE_PREFIX)
        slice_product = labels.get(f"{resource}.product") or f"{product or 'NVIDIA'}-MIG-{profile}"
        out.append((DeviceClass(resource, slice_product, slice_mib * MIB, True), slices))
    return out


def _schedulable(node: Mapping[str, Any]) -> bool:
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _requested_by_node(
    pods: Iterable[Mapping[str, Any]], exclude: Callable[[Mapping[str, Any]], bool] | None
) -> defaultdict[str, dict[str, int]]:
    used: defaultdict[str, dict[str, int]] = defaultdict(dict)
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or (pod.get("status") or {}).get("phase") in _FINISHED_PHASES:
            continue
        if exclude is not None and exclude(pod):
            continue
        for resource, n in _pod_gpu_requests(pod).items():
            used[node][resource] = used[node].get(resource, 0) + n
    return used


def _pod_gpu_requests(pod: Mapping[str, Any]) -> dict[str, int]:
    return pod_requests(pod, _container_gpus)


def pod_requests(pod: Mapping[str, Any], amounts: Callable[[Mapping[str, Any]], Mapping[str, int]]) -> dict[str, int]:
    """What the scheduler charges a pod, of the resources `amounts` reads from a container: app and
    sidecar containers add up; plain init containers run one at a time, so only the largest counts."""
    spec = pod.get("spec") or {}
    running: dict[str, int] = {}
    init_peak: dict[str, int] = {}
    for container in spec.get("initContainers") or []:
        sidecar = container.get("restartPolicy") == "Always"
        for resource, n in amounts(container).items():
            if sidecar:
                running[resource] = running.get(resource, 0) + n
            else:
                init_peak[resource] = max(init_peak.get(resource, 0), n)
    for container in spec.get("containers") or []:
        for resource, n in amounts(container).items():
            running[resource] = running.get(resource, 0) + n
    return {r: max(running.get(r, 0), init_peak.get(r, 0)) for r in sorted(running.keys() | init_peak.keys())}


def _container_gpus(container: Mapping[str, Any]) -> dict[str, int]:
    resources = container.get("resources") or {}
    # Extended resources must have requests == limits; a limit alone implies the request.
    merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {r: _count(v) for r, v in merged.items() if r.startswith("nvidia.com/") and _count(v) > 0}


def _count(value: Any) -> int:
    """A whole-number quantity ("8", 8); anything else counts as none."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return 0
