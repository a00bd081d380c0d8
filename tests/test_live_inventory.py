"""The inventory kept one event at a time (LiveInventory) equals the one counted from scratch.

The oracle below counts from the full lists, as the operator did on every reconcile before the
inventory was kept incrementally; the property drives a LiveInventory through random node and pod
events (adds, changes, deletions, in any order) and compares after every one.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from slmfleet.sizing.cpu import container_cpu_memory, cpu_node_of
from slmfleet.sizing.inventory import (
    Inventory,
    LiveInventory,
    NodeGpus,
    _devices,
    _schedulable,
    inventory_from_nodes,
    pod_requests,
)
from tests.sizing_nodes import gpu_node, gpu_pod


def from_scratch(nodes: dict[str, dict[str, Any]], pods: dict[str, dict[str, Any]],
                 exclude: frozenset[str] = frozenset()) -> Inventory:
    counted = [p for uid, p in pods.items() if uid not in exclude and p["spec"].get("nodeName")
               and p["status"].get("phase") not in ("Succeeded", "Failed")]
    gpus: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
    cpu: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
    for pod in counted:
        node = pod["spec"]["nodeName"]
        for r, n in pod_requests(pod, lambda c: {k: int(v) for k, v in
                                                 {**(c.get("resources") or {}).get("limits", {}),
                                                  **(c.get("resources") or {}).get("requests", {})}.items()
                                                 if k.startswith("nvidia.com/")}).items():
            gpus[node][r] += n
        for r, n in pod_requests(pod, container_cpu_memory).items():
            cpu[node][r] += n
    entries, cpu_nodes = [], []
    for name, node in nodes.items():
        if not _schedulable(node):
            continue
        labels = node["metadata"]["labels"]
        for device, count in _devices(labels, node["status"]["allocatable"]):
            entries.append(NodeGpus(name, labels, device, count, max(0, count - gpus[name][device.resource])))
        if (c := cpu_node_of(node, cpu[name])) is not None:
            cpu_nodes.append(c)
    smallest: dict[tuple[str, str], int] = {}
    for e in entries:
        k = (e.device.resource, e.device.product)
        smallest[k] = min(smallest.get(k, e.device.memory_bytes), e.device.memory_bytes)
    entries = [replace(e, device=replace(e.device, memory_bytes=smallest[(e.device.resource, e.device.product)]))
               for e in entries]
    return Inventory(tuple(sorted(entries, key=lambda e: (e.node_name, e.device))),
                     tuple(sorted(cpu_nodes, key=lambda c: c.node_name)))


def cpu_node(name: str, cores: int, memory_gib: int) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}, "spec": {},
            "status": {"allocatable": {"cpu": str(cores), "memory": f"{memory_gib}Gi"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def cpu_pod(node: str | None, uid: str, cores: int, phase: str = "Running") -> dict[str, Any]:
    res = {"cpu": str(cores), "memory": f"{cores}Gi"}
    spec: dict[str, Any] = {"containers": [{"name": "vllm", "resources": {"requests": res, "limits": res}}]}
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": f"p-{uid}", "uid": uid}, "spec": spec, "status": {"phase": phase}}


NODE_NAMES = [f"n{i}" for i in range(5)]
PRODUCTS = [("NVIDIA-L4", 23034), ("NVIDIA-A100-SXM4-40GB", 40960), ("NVIDIA-A100-SXM4-40GB", 40536)]


@st.composite
def node_event(draw):
    name = draw(st.sampled_from(NODE_NAMES))
    kind = draw(st.sampled_from(["gpu", "gpu", "cpu", "gone"]))
    if kind == "gone":
        return ("node", name, None)
    if kind == "cpu":
        return ("node", name, cpu_node(name, draw(st.sampled_from([2, 8])), draw(st.sampled_from([8, 64]))))
    product, memory = draw(st.sampled_from(PRODUCTS))
    return ("node", name, gpu_node(name, product, memory, draw(st.sampled_from([1, 4, 8])),
                                   ready=draw(st.integers(0, 4)) > 0, unschedulable=draw(st.integers(0, 5)) == 0))


@st.composite
def pod_event(draw):
    uid = f"u{draw(st.integers(0, 7))}"
    if draw(st.integers(0, 4)) == 0:
        return ("pod", uid, None)
    node = draw(st.none() | st.sampled_from(NODE_NAMES))
    phase = draw(st.sampled_from(["Running", "Running", "Pending", "Succeeded"]))
    if draw(st.booleans()):
        return ("pod", uid, cpu_pod(node, uid, draw(st.integers(1, 4)), phase))
    return ("pod", uid, gpu_pod(node, draw(st.integers(1, 4)), phase=phase, uid=uid, init=draw(st.integers(0, 5))))


@settings(max_examples=150, deadline=None)
@given(st.lists(node_event() | pod_event(), min_size=1, max_size=40), st.sets(st.sampled_from([f"u{i}" for i in range(8)])))
def test_kept_one_event_at_a_time_it_equals_the_inventory_counted_from_scratch(events, exclude):
    live = LiveInventory()
    nodes: dict[str, dict[str, Any]] = {}
    pods: dict[str, dict[str, Any]] = {}
    for kind, key, obj in events:
        table = nodes if kind == "node" else pods
        if obj is None:
            table.pop(key, None)
        else:
            table[key] = copy.deepcopy(obj)
        (live.set_node if kind == "node" else live.set_pod)(key, obj)
        assert live.inventory() == from_scratch(nodes, pods)
    assert live.inventory(frozenset(exclude)) == from_scratch(nodes, pods, frozenset(exclude))
    # ... and the list-based entry point counts the same way
    assert inventory_from_nodes(list(nodes.values()), list(pods.values()),
                                exclude_pods=lambda p: p["metadata"]["uid"] in exclude) == \
        from_scratch(nodes, pods, frozenset(exclude))


def test_a_pod_event_that_changes_nothing_held_reports_no_change_and_keeps_the_snapshot():
    live = LiveInventory()
    live.set_node("n0", gpu_node("n0", "NVIDIA-L4", 23034, 4))
    assert live.set_pod("u1", gpu_pod("n0", 2, uid="u1"))
    first = live.inventory()
    assert [e.free for e in first.nodes] == [2]
    relabelled = gpu_pod("n0", 2, uid="u1")
    relabelled["metadata"]["labels"] = {"x": "y"}
    assert not live.set_pod("u1", relabelled)
    assert live.inventory() is first  # nothing recomputed
    assert live.set_pod("u1", gpu_pod("n0", 2, uid="u1", phase="Succeeded"))
    assert [e.free for e in live.inventory().nodes] == [4]


def test_excluding_a_models_own_pods_gives_their_devices_back_without_touching_the_snapshot():
    live = LiveInventory()
    live.set_node("n0", gpu_node("n0", "NVIDIA-L4", 23034, 4))
    live.set_node("c0", cpu_node("c0", 8, 64))
    live.set_pod("own", gpu_pod("n0", 3, uid="own"))
    live.set_pod("other", gpu_pod("n0", 1, uid="other"))
    live.set_pod("cpu", cpu_pod("c0", "cpu", 2))
    snapshot = live.inventory()
    assert [e.free for e in snapshot.nodes] == [0]
    assert [e.free for e in live.inventory(frozenset({"own"})).nodes] == [3]
    assert live.inventory(frozenset({"cpu"})).cpu_nodes[0].free_millicores == 8000
    assert live.inventory() is snapshot


def test_devices_reserved_for_unbound_pods_are_taken_from_the_first_nodes_with_room():
    live = LiveInventory()
    for name in ("n0", "n1", "n2"):
        live.set_node(name, gpu_node(name, "NVIDIA-L4", 23034, 2))
    live.set_node("a0", gpu_node("a0", "NVIDIA-A100-SXM4-40GB", 40960, 8))
    live.set_pod("u1", gpu_pod("n0", 1, uid="u1"))
    l4 = ("nvidia.com/gpu", "NVIDIA-L4")
    assert live.set_reservations(("ns", "a"), {"r1": {l4: 3}}) == 3
    assert live.set_reservations(("ns", "b"), {"r9": {l4: 1}}) == 1
    free = {e.node_name: e.free for e in live.inventory().nodes}
    assert free == {"a0": 8, "n0": 0, "n1": 0, "n2": 1}  # n0's last device, then n1's two, then one of n2
    # A model does not compete with its own revision's reservation, nor with later ones: b
    # reserved after a, so a sees all but its own; b sees a's three.
    own = {e.node_name: e.free for e in live.inventory(reserved_for=(("ns", "a"), "r1")).nodes}
    assert own == {"a0": 8, "n0": 1, "n1": 2, "n2": 2}
    later = {e.node_name: e.free for e in live.inventory(reserved_for=(("ns", "b"), "r9")).nodes}
    assert later == {"a0": 8, "n0": 0, "n1": 0, "n2": 2}
    assert live.set_reservations(("ns", "a"), {"r1": {l4: 1}}) == -2  # two of its pods were bound
    assert live.set_reservations(("ns", "a"), {"r1": {l4: 1}}) == 0
    assert live.set_reservations(("ns", "b"), {}) == -1
    assert {e.node_name: e.free for e in live.inventory().nodes} == {"a0": 8, "n0": 0, "n1": 2, "n2": 2}


def test_a_deployments_unbound_pods_are_what_it_reserves():
    from slmfleet.controller.reservations import wanted_devices

    def deployment(revision: str, replicas: int, key: str) -> dict:
        return {"metadata": {"labels": {"slmfleet.io/revision": revision}},
                "spec": {"replicas": replicas,
                         "template": {"metadata": {"annotations": {"slmfleet.io/placement": key}}}}}

    l4, mig = "nvidia.com/gpu|NVIDIA-L4|2", "nvidia.com/mig-1g.5gb|NVIDIA-A100-SXM4-40GB-MIG-1g.5gb|1"

    def pod(revision: str, node: str | None, phase: str = "Running", key: str = l4) -> dict:
        return {"metadata": {"labels": {"slmfleet.io/revision": revision},
                             "annotations": {"slmfleet.io/placement": key}},
                "spec": {"nodeName": node} if node else {}, "status": {"phase": phase}}

    deployments = [deployment("r1", 3, l4),
                   deployment("r2", 1, mig),
                   deployment("r3", 2, "cpu|CPU-BF16|4")]  # CPU placements reserve nothing here
    pods = [pod("r1", "n0"), pod("r1", None), pod("r1", "n1", phase="Failed"), pod("r2", "n2", key=mig)]
    assert wanted_devices(deployments, pods) == {"r1": {("nvidia.com/gpu", "NVIDIA-L4"): 4}}
    # Moved from the slice to an L4: its pod still on the slice does not stand for the new one.
    moved = [deployment("r2", 1, "nvidia.com/gpu|NVIDIA-L4|1")]
    assert wanted_devices(moved, [pod("r2", "n2", key=mig)]) == {"r2": {("nvidia.com/gpu", "NVIDIA-L4"): 1}}



def test_a_reservation_beyond_the_free_devices_is_the_latest_ones_problem_only():
    """Reservations are served first come, first served: one model that over-reserves a class (a
    scale-up into it) sees no room, while those that reserved before it still see theirs."""
    live = LiveInventory()
    live.set_node("n0", gpu_node("n0", "NVIDIA-L4", 23034, 3))
    l4 = ("nvidia.com/gpu", "NVIDIA-L4")
    for name in ("a", "b", "c"):
        live.set_reservations(name, {"r": {l4: 1}})
    live.set_reservations("d", {"r": {l4: 1}})  # the class had no room left for it

    def room(group: str) -> int:
        return sum(e.free for e in live.inventory(reserved_for=(group, "r")).nodes)

    assert [room(g) for g in "abcd"] == [3, 2, 1, 0]  # what the earlier promises leave
    assert sum(e.free for e in live.inventory().nodes) == 0  # a new model sees every reservation
    live.set_reservations("b", {})  # b's pod was bound elsewhere, or b went away
    live.set_reservations("b", {"r": {l4: 1}})  # back again: it is the latest now
    assert [room(g) for g in "acdb"] == [3, 2, 1, 0]


def test_a_model_that_moves_into_a_class_queues_behind_those_already_waiting_there():
    live = LiveInventory()
    live.set_node("l4", gpu_node("l4", "NVIDIA-L4", 23034, 1))
    live.set_node("a10", gpu_node("a10", "NVIDIA-A10G", 23028, 1))
    l4, a10 = ("nvidia.com/gpu", "NVIDIA-L4"), ("nvidia.com/gpu", "NVIDIA-A10G")
    live.set_reservations("old", {"r": {a10: 1}})  # waiting on the A10G first
    live.set_reservations("young", {"r": {l4: 1}})  # then a model waits for the L4
    live.set_reservations("old", {"r": {l4: 1}})  # the old one moves to the L4: it is the latest there

    def free(group: str, product: str) -> int:
        return sum(e.free for e in live.inventory(reserved_for=(group, "r")).nodes if e.device.product == product)

    assert free("young", "NVIDIA-L4") == 1  # keeps its L4
    assert free("old", "NVIDIA-L4") == 0  # sees that it does not fit there
    # A class a model waits in no longer is one where it would be the latest: it sees every reservation.
    live.set_reservations("other", {"r": {a10: 1}})
    assert free("old", "NVIDIA-A10G") == 0 and free("other", "NVIDIA-A10G") == 1
