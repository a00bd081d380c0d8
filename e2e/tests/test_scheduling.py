"""The real kube-scheduler places GPU pods on the simulated fleet by its GFD labels and
allocatable resources."""

from kubernetes import client

from e2e.tests.conftest import pod_events
from e2e.wait import wait_for


def gpu_pod(name: str, resources: dict[str, str], node_selector: dict[str, str] | None = None) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            node_selector=node_selector,
            # Stay off the process nodes: these pods only need the scheduler and kwok.
            affinity=client.V1Affinity(node_affinity=client.V1NodeAffinity(
                required_during_scheduling_ignored_during_execution=client.V1NodeSelector(node_selector_terms=[
                    client.V1NodeSelectorTerm(match_expressions=[client.V1NodeSelectorRequirement(
                        key="slmfleet.io/node-agent", operator="In", values=["kwok"])])])),
            ),
            containers=[client.V1Container(name="main", image="busybox",
                                           resources=client.V1ResourceRequirements(limits=resources))],
        ),
    )


def test_l4_pod_is_scheduled_onto_an_l4_node_and_runs(core, namespace):
    core.create_namespaced_pod(namespace, gpu_pod("l4", {"nvidia.com/gpu": "1"}, {"nvidia.com/gpu.product": "NVIDIA-L4"}))
    pod = wait_for(lambda: (p := core.read_namespaced_pod("l4", namespace)).status.phase == "Running" and p,
                   what="pod Running")
    node = core.read_node(pod.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-L4"
    assert node.metadata.labels["slmfleet.io/node-agent"] == "kwok"
    assert pod.status.pod_ip.startswith("127.")


def test_pod_asking_for_64_gpus_stays_pending_with_failed_scheduling(core, namespace):
    core.create_namespaced_pod(namespace, gpu_pod("huge", {"nvidia.com/gpu": "64"}))
    events = wait_for(lambda: [e for e in pod_events(core, namespace, "huge") if e.reason == "FailedScheduling"],
                      what="FailedScheduling event")
    assert "nvidia.com/gpu" in events[0].message
    pod = core.read_namespaced_pod("huge", namespace)
    assert pod.status.phase == "Pending" and not pod.spec.node_name


def test_mig_slice_request_lands_on_a_mig_partitioned_node(core, namespace):
    core.create_namespaced_pod(namespace, gpu_pod("mig", {"nvidia.com/mig-1g.5gb": "1"}))
    pod = wait_for(lambda: (p := core.read_namespaced_pod("mig", namespace)).status.phase == "Running" and p,
                   what="pod Running")
    labels = core.read_node(pod.spec.node_name).metadata.labels
    assert labels["nvidia.com/mig.strategy"] == "mixed"
    assert int(labels["nvidia.com/mig-1g.5gb.count"]) > 0


def test_fleet_has_gfd_labels_matching_allocatable(core, cluster):
    nodes = core.list_node().items
    gpu_nodes = [n for n in nodes if "nvidia.com/gpu.product" in n.metadata.labels]
    assert len(gpu_nodes) >= 10
    for n in gpu_nodes:
        labels, alloc = n.metadata.labels, n.status.allocatable
        whole = int(alloc.get("nvidia.com/gpu", "0"))
        mig_gpus = sum(int(alloc[r]) for r in alloc if r.startswith("nvidia.com/mig-")) > 0
        assert whole == int(labels["nvidia.com/gpu.count"]) or mig_gpus, n.metadata.name
        assert int(labels["nvidia.com/gpu.memory"]) > 20000
        assert n.spec.pod_cidr.startswith("127.")
    products = {n.metadata.labels["nvidia.com/gpu.product"] for n in gpu_nodes}
    assert {"NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-40GB", "NVIDIA-L4"} <= products
    assert any("nvidia.com/gpu.product" not in n.metadata.labels for n in nodes), "CPU-only nodes expected"
