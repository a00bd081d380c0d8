"""The cluster's GPUs: what each schedulable node offers and how much of it is still free.

Read from NVIDIA GPU Feature Discovery labels and the device plugin's allocatable resources:
whole GPUs are `nvidia.com/gpu` (product and memory in `nvidia.com/gpu.product` and
`nvidia.com/gpu.memory`, MiB); under the MIG "mixed" strategy each slice profile is its own
resource `nvidia.com/mig-<profile>` described by `nvidia.com/mig-<profile>.{product,memory}`.
Under the "single" strategy slices are advertised as `nvidia.com/gpu` with a `-MIG-` product.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from slmfleet.sizing.cpu import CpuNode, container_cpu_memory, cpu_node_of
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
    """The inventory of `nodes` less what `pods` hold, the pods `exclude_pods` picks not counted."""
    live = LiveInventory()
    for node in nodes:
        live.set_node(str((node.get("metadata") or {}).get("name", "")), node)
    excluded = set()
    for i, pod in enumerate(pods):
        key = str((pod.get("metadata") or {}).get("uid") or f"#{i}")
        live.set_pod(key, pod)
        if exclude_pods is not None and exclude_pods(pod):
            excluded.add(key)
    return live.inventory(frozenset(excluded))


@dataclass(frozen=True)
class _NodeFacts:
    """What sizing reads of a node, parsed once per change of the node."""

    schedulable: bool
    labels: Mapping[str, str] = field(hash=False)
    devices: tuple[tuple[DeviceClass, int], ...]  # device memory as its own labels say
    cpu: CpuNode | None  # as a CPU node with nothing used; None if it is not one


@dataclass(frozen=True)
class _Hold:
    """What a bound, unfinished pod holds on its node."""

    node: str
    gpus: Mapping[str, int] = field(hash=False)
    cpu_memory: Mapping[str, int] = field(hash=False)


class LiveInventory:
    """The inventory, kept up to date one node or pod at a time.

    Rebuilding the inventory from every node and pod costs time in proportion to the fleet, and
    every reconcile needs it: a fleet of N models reconciling against N pods is N² work. Here a
    pod's change costs one node's arithmetic, a node's change one pass over the nodes (a product's
    memory is the smallest any node reports, so one node can change the others' entries), and a
    reconcile gets the current snapshot, adjusted for the few pods it must not count (its own).
    `inventory_from_nodes` builds one of these from lists, so there is one way to count.
    """

    def __init__(self) -> None:
        self._nodes: dict[str, _NodeFacts] = {}
        self._holds: dict[str, _Hold] = {}
        self._gpu_used: dict[str, dict[str, int]] = {}
        self._cpu_used: dict[str, dict[str, int]] = {}
        self._smallest: dict[tuple[str, str], int] | None = None  # None: nodes changed, recompute
        self._entries: dict[str, tuple[NodeGpus, ...]] = {}  # schedulable node -> its devices
        self._cpu_entries: dict[str, CpuNode] = {}
        self._snapshot: Inventory | None = None
        # Devices promised to pods not bound yet: group (a model) -> owner (a revision) ->
        # (resource, product) -> devices. See `set_reservations`.
        self._reserved: dict[Hashable, dict[Hashable, dict[tuple[str, str], int]]] = {}
        self._reserved_total: dict[tuple[str, str], int] = {}
        # When each group's reservations of a (resource, product) began: an earlier one is served
        # first (`inventory`). Per device class: a model that moves into a class queues behind
        # those already waiting there, however long it has waited elsewhere.
        self._reserved_since: dict[tuple[Hashable, tuple[str, str]], int] = {}
        self._reservations_made = 0
        self._reserved_snapshot: Inventory | None = None

    def __len__(self) -> int:
        return len(self._nodes)

    def set_node(self, name: str, node: Mapping[str, Any] | None) -> bool:
        """Record the node as it is now (None: deleted). Whether what sizing reads changed."""
        facts = None if node is None else _node_facts(node)
        if self._nodes.get(name) == facts:
            return False
        if facts is None:
            self._nodes.pop(name, None)
        else:
            self._nodes[name] = facts
        self._smallest = None
        self._snapshot = None
        return True

    def set_pod(self, key: str, pod: Mapping[str, Any] | None) -> bool:
        """Record the pod (by uid) as it is now (None: deleted). Whether what it holds changed."""
        hold = None if pod is None else _hold(pod)
        before = self._holds.get(key)
        if before == hold:
            return False
        if before is not None:
            self._charge(before, -1)
            del self._holds[key]
        if hold is not None:
            self._charge(hold, 1)
            self._holds[key] = hold
        return True

    def set_reservations(self, group: Hashable, owners: Mapping[Any, Mapping[tuple[str, str], int]]) -> int:
        """Replace the group's reservations: devices of a (resource, product) its Deployments want
        for pods that are not bound yet. A thousand models placed in one burst would otherwise all
        be placed on the same free devices, their pods not yet on the nodes to count; the scheduler
        puts pods on the first nodes with room, and so does the inventory with what is reserved.
        By how many devices the group's reservations grew (negative: shrank)."""
        wanted = {owner: {k: n for k, n in amounts.items() if n > 0} for owner, amounts in owners.items()}
        wanted = {owner: amounts for owner, amounts in wanted.items() if amounts}
        before = self._reserved.get(group, {})
        if before == wanted:
            return 0
        growth = sum(sum(a.values()) for a in wanted.values()) - sum(sum(a.values()) for a in before.values())
        for amounts in self._reserved.pop(group, {}).values():
            for k, n in amounts.items():
                self._reserved_total[k] -= n
        if wanted:
            self._reserved[group] = wanted
        classes = {k for amounts in wanted.values() for k in amounts}
        for k in {k for amounts in before.values() for k in amounts} - classes:
            self._reserved_since.pop((group, k), None)
        for k in sorted(classes - {k for amounts in before.values() for k in amounts}):
            self._reservations_made += 1
            self._reserved_since[(group, k)] = self._reservations_made
        for amounts in wanted.values():
            for k, n in amounts.items():
                self._reserved_total[k] = self._reserved_total.get(k, 0) + n
        self._reserved_total = {k: n for k, n in self._reserved_total.items() if n}
        self._reserved_snapshot = None
        return growth

    def holds(self, key: str) -> bool:
        """Whether the pod `key` holds anything now."""
        return key in self._holds

    def _charge(self, hold: _Hold, sign: int) -> None:
        for table, amounts in ((self._gpu_used, hold.gpus), (self._cpu_used, hold.cpu_memory)):
            used = table.setdefault(hold.node, {})
            for resource, n in amounts.items():
                used[resource] = used.get(resource, 0) + sign * n
        if self._smallest is not None:
            self._refresh_node(hold.node)
        self._snapshot = None

    def inventory(self, exclude: frozenset[str] = frozenset(),
                  reserved_for: tuple[Hashable, Hashable] | None = None) -> Inventory:
        """The inventory now, the pods of `exclude` (keys given to `set_pod`) not counted, less
        what is reserved for pods not bound yet except the reservation of `reserved_for` (group, owner).

        For a group that holds reservations, only those made before its own are taken: devices are
        promised first come, first served. One model that reserves more than is free (a scale-up
        into a full class) then sees that it does not fit, rather than every model still waiting
        for its pods in that class seeing that none of them does."""
        if self._smallest is None:
            self._rebuild()
        if self._snapshot is None:
            self._snapshot = Inventory(
                tuple(e for name in sorted(self._entries) for e in self._entries[name]),
                tuple(self._cpu_entries[name] for name in sorted(self._cpu_entries)))
            self._reserved_snapshot = None
        mine = {} if reserved_for is None else self._reserved.get(reserved_for[0], {})
        holds = [self._holds[k] for k in exclude if k in self._holds]
        if not holds and not mine:
            if self._reserved_snapshot is None:
                self._reserved_snapshot = _less_reserved(self._snapshot, self._reserved_total)
            return self._reserved_snapshot
        if not mine:
            return _less_reserved(self._with_given_back(holds), self._reserved_total)
        assert reserved_for is not None
        group = reserved_for[0]
        since = {k: self._reserved_since[(group, k)] for amounts in mine.values() for k in amounts}
        totals: dict[tuple[str, str], int] = {}
        for other, owners in self._reserved.items():
            for owner, amounts in owners.items():
                if other == group and owner == reserved_for[1]:
                    continue
                for k, n in amounts.items():
                    # In a class it waits in, the model sees the reservations made before its own;
                    # in any other class (where it would be the latest), all of them.
                    if other == group or k not in since or self._reserved_since[(other, k)] < since[k]:
                        totals[k] = totals.get(k, 0) + n
        return _less_reserved(self._with_given_back(holds), totals)

    def _with_given_back(self, holds: list[_Hold]) -> Inventory:
        assert self._snapshot is not None
        if not holds:
            return self._snapshot
        gpus_back: dict[str, dict[str, int]] = {}
        cpu_back: dict[str, dict[str, int]] = {}
        for hold in holds:
            for table, amounts in ((gpus_back, hold.gpus), (cpu_back, hold.cpu_memory)):
                back = table.setdefault(hold.node, {})
                for resource, n in amounts.items():
                    back[resource] = back.get(resource, 0) + n
        return Inventory(
            tuple(_give_back_gpus(e, gpus_back[e.node_name]) if e.node_name in gpus_back else e
                  for e in self._snapshot.nodes),
            tuple(_give_back_cpu(c, cpu_back[c.node_name]) if c.node_name in cpu_back else c
                  for c in self._snapshot.cpu_nodes))

    def _rebuild(self) -> None:
        smallest: dict[tuple[str, str], int] = {}
        for facts in self._nodes.values():
            if facts.schedulable:
                for device, _ in facts.devices:
                    key = (device.resource, device.product)
                    smallest[key] = min(smallest.get(key, device.memory_bytes), device.memory_bytes)
        self._smallest = smallest
        self._entries, self._cpu_entries = {}, {}
        for name in self._nodes:
            self._refresh_node(name)

    def _refresh_node(self, name: str) -> None:
        """Recompute one node's entries from its facts and what its pods hold."""
        assert self._smallest is not None
        facts = self._nodes.get(name)
        self._entries.pop(name, None)
        self._cpu_entries.pop(name, None)
        if facts is None or not facts.schedulable:
            return
        used = self._gpu_used.get(name, {})
        entries = tuple(
            NodeGpus(name, facts.labels,
                     replace(device, memory_bytes=self._smallest[(device.resource, device.product)]),
                     count, max(0, count - used.get(device.resource, 0)))
            for device, count in sorted(facts.devices, key=lambda d: d[0]))
        if entries:
            self._entries[name] = entries
        if facts.cpu is not None:
            cpu_used = self._cpu_used.get(name, {})
            self._cpu_entries[name] = replace(
                facts.cpu,
                free_millicores=max(0, facts.cpu.allocatable_millicores - cpu_used.get("cpu", 0)),
                free_memory=max(0, facts.cpu.allocatable_memory - cpu_used.get("memory", 0)))


def _less_reserved(inventory: Inventory, reserved: Mapping[tuple[str, str], int]) -> Inventory:
    """The inventory less the reserved devices, taken from the first nodes (by name) with room."""
    left = {k: n for k, n in reserved.items() if n > 0}
    if not left:
        return inventory
    entries = []
    for entry in inventory.nodes:
        key = (entry.device.resource, entry.device.product)
        take = min(entry.free, left.get(key, 0))
        if take:
            left[key] -= take
            entry = replace(entry, free=entry.free - take)
        entries.append(entry)
    return Inventory(tuple(entries), inventory.cpu_nodes)


def _give_back_gpus(entry: NodeGpus, back: Mapping[str, int]) -> NodeGpus:
    n = back.get(entry.device.resource, 0)
    return replace(entry, free=min(entry.allocatable, entry.free + n)) if n else entry


def _give_back_cpu(node: CpuNode, back: Mapping[str, int]) -> CpuNode:
    return replace(node, free_millicores=min(node.allocatable_millicores, node.free_millicores + back.get("cpu", 0)),
                   free_memory=min(node.allocatable_memory, node.free_memory + back.get("memory", 0)))


def _node_facts(node: Mapping[str, Any]) -> _NodeFacts:
    labels = {str(k): str(v) for k, v in ((node.get("metadata") or {}).get("labels") or {}).items()}
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    return _NodeFacts(_schedulable(node), labels, tuple(_devices(labels, allocatable)), cpu_node_of(node, {}))


def _hold(pod: Mapping[str, Any]) -> _Hold | None:
    """What the pod holds, or None for a pod that holds nothing (not bound, or finished)."""
    if not _counts(pod, None):
        return None
    node = str((pod.get("spec") or {}).get("nodeName"))
    return _Hold(node, _pod_gpu_requests(pod), pod_requests(pod, container_cpu_memory))


def _counts(pod: Mapping[str, Any], exclude: Callable[[Mapping[str, Any]], bool] | None) -> bool:
    """A pod that holds its node's resources: bound, not finished, not excluded."""
    if not (pod.get("spec") or {}).get("nodeName") or (pod.get("status") or {}).get("phase") in _FINISHED_PHASES:
        return False
    return exclude is None or not exclude(pod)


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
