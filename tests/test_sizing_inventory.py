from slmfleet.sizing import inventory_from_nodes
from slmfleet.sizing.memory import MIB
from tests.sizing_nodes import default_fleet, gpu_node, gpu_pod


def _by_node(inventory):
    return {(n.node_name, n.device.resource): n for n in inventory.nodes}


def test_default_fleet_offers_whole_gpus_and_mig_slices():
    inv = inventory_from_nodes(default_fleet(), [])
    classes = {(d.resource, d.product): d for d in inv.device_classes()}
    assert set(classes) == {
        ("nvidia.com/gpu", "NVIDIA-H100-80GB-HBM3"),
        ("nvidia.com/gpu", "NVIDIA-A100-SXM4-40GB"),
        ("nvidia.com/gpu", "NVIDIA-L4"),
        ("nvidia.com/mig-1g.5gb", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"),
        ("nvidia.com/mig-2g.10gb", "NVIDIA-A100-SXM4-40GB-MIG-2g.10gb"),
        ("nvidia.com/mig-3g.20gb", "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb"),
    }
    assert classes[("nvidia.com/gpu", "NVIDIA-H100-80GB-HBM3")].memory_bytes == 81559 * MIB
    assert classes[("nvidia.com/mig-3g.20gb", "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb")].memory_bytes == 19968 * MIB
    assert all(d.is_mig == d.resource.startswith("nvidia.com/mig-") for d in classes.values())
    nodes = _by_node(inv)
    assert nodes[("a100-40gb-mig-0", "nvidia.com/mig-1g.5gb")].free == 16
    # Fully partitioned MIG nodes offer no whole GPUs; CPU nodes offer nothing.
    assert ("a100-40gb-mig-0", "nvidia.com/gpu") not in nodes
    assert not any(name.startswith("cpu-") for name, _ in nodes)
    assert sum(n.free for n in inv.nodes if n.device.product == "NVIDIA-L4") == 6


def test_pod_requests_are_subtracted_from_their_node():
    nodes = [gpu_node("h-0", "NVIDIA-H100-80GB-HBM3", 81559, 8), gpu_node("h-1", "NVIDIA-H100-80GB-HBM3", 81559, 8)]
    pods = [
        gpu_pod("h-0", 2, uid="a"),
        gpu_pod("h-0", 1, limits_only=True, uid="b"),  # a limit implies the request
        gpu_pod("h-0", 8, phase="Succeeded", uid="c"),  # finished pods hold nothing
        gpu_pod("h-0", 8, phase="Failed", uid="d"),
        gpu_pod(None, 8, phase="Pending", uid="e"),  # not bound yet
        gpu_pod("h-1", 1, init=3, uid="f"),  # an init container's 3 exceeds the app's 1
        gpu_pod("h-1", 1, phase="Pending", uid="g"),  # bound but not started: it holds its devices
    ]
    inv = _by_node(inventory_from_nodes(nodes, pods))
    assert inv[("h-0", "nvidia.com/gpu")].free == 5
    assert inv[("h-1", "nvidia.com/gpu")].free == 4
    assert inv[("h-0", "nvidia.com/gpu")].allocatable == 8


def test_excluded_pods_are_not_counted():
    nodes = [gpu_node("l-0", "NVIDIA-L4", 23034, 1)]
    pods = [gpu_pod("l-0", 1, uid="mine")]
    assert inventory_from_nodes(nodes, pods).nodes[0].free == 0
    inv = inventory_from_nodes(nodes, pods, exclude_pods=lambda p: p["metadata"]["uid"] == "mine")
    assert inv.nodes[0].free == 1


def test_free_never_goes_negative():
    inv = inventory_from_nodes([gpu_node("l-0", "NVIDIA-L4", 23034, 1)], [gpu_pod("l-0", 3, uid="x")])
    assert inv.nodes[0].free == 0


def test_mig_slices_are_counted_per_profile():
    nodes = [n for n in default_fleet() if n["metadata"]["name"] == "a100-40gb-mig-0"]
    pods = [gpu_pod("a100-40gb-mig-0", 1, resource="nvidia.com/mig-3g.20gb", uid="x")]
    inv = _by_node(inventory_from_nodes(nodes, pods))
    assert inv[("a100-40gb-mig-0", "nvidia.com/mig-3g.20gb")].free == 7
    assert inv[("a100-40gb-mig-0", "nvidia.com/mig-1g.5gb")].free == 16


def test_unschedulable_not_ready_and_unlabelled_nodes_contribute_nothing():
    bare = gpu_node("bare", "NVIDIA-L4", 23034, 1)
    del bare["metadata"]["labels"]["nvidia.com/gpu.memory"]  # cannot be sized without GFD's memory label
    no_conditions = gpu_node("new", "NVIDIA-L4", 23034, 1)
    del no_conditions["status"]["conditions"]
    nodes = [
        gpu_node("cordoned", "NVIDIA-L4", 23034, 1, unschedulable=True),
        gpu_node("down", "NVIDIA-L4", 23034, 1, ready=False),
        bare,
        no_conditions,
        {
            "metadata": {"name": "cpu"},
            "status": {"allocatable": {"cpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]},
        },
    ]
    assert inventory_from_nodes(nodes, []).nodes == ()


def test_mig_single_strategy_marks_the_whole_gpu_resource_as_slices():
    node = gpu_node("s", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", 4864, 7, labels={"nvidia.com/mig.strategy": "single"})
    (entry,) = inventory_from_nodes([node], []).nodes
    assert entry.device.resource == "nvidia.com/gpu" and entry.device.is_mig and entry.free == 7


def test_selector_keeps_matching_nodes_and_order_is_stable():
    nodes = default_fleet()
    inv = inventory_from_nodes(nodes, [])
    assert inventory_from_nodes(list(reversed(nodes)), []) == inv
    l4 = inv.matching({"slmfleet.io/pool": "process-l4"})
    assert [n.node_name for n in l4.nodes] == ["process-l4-0", "process-l4-1"]


def test_nodes_that_disagree_on_a_products_memory_are_sized_by_the_smallest():
    nodes = [gpu_node("a", "NVIDIA-L4", 23034, 1), gpu_node("b", "NVIDIA-L4", 20000, 1)]
    inv = inventory_from_nodes(nodes, [])
    assert {n.device.memory_bytes for n in inv.nodes} == {20000 * MIB}
    assert len(inv.device_classes()) == 1
