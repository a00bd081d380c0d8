import ipaddress
import textwrap
from pathlib import Path

import pytest

from e2e import pools as p

DEFAULT = Path(__file__).resolve().parents[1] / "e2e" / "pools" / "default.yaml"


def test_default_fleet_is_a_realistic_mix():
    nodes = p.expand(*p.load_pools_doc(DEFAULT))
    gpu_nodes = [n for n in nodes if "nvidia.com/gpu.product" in n.labels]
    assert len(gpu_nodes) >= 10
    products = {n.labels["nvidia.com/gpu.product"] for n in gpu_nodes}
    assert products == {"NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-40GB", "NVIDIA-L4"}
    assert any("nvidia.com/gpu.product" not in n.labels for n in nodes)
    process = [n for n in nodes if n.agent == "process"]
    assert len(process) == 2
    assert all(n.labels["nvidia.com/gpu.product"] == "NVIDIA-L4" and n.allocatable["nvidia.com/gpu"] == "1"
               for n in process)
    assert all(n.labels[p.AGENT_LABEL] == n.agent for n in nodes)


def test_pod_cidrs_are_distinct_loopback_networks():
    nodes = p.expand(*p.load_pools_doc(DEFAULT))
    nets = [ipaddress.IPv4Network(n.pod_cidr) for n in nodes]
    loopback = ipaddress.IPv4Network("127.0.0.0/8")
    assert all(net.subnet_of(loopback) for net in nets)
    assert len(set(nets)) == len(nets)
    assert not any(net.overlaps(ipaddress.IPv4Network("127.0.0.0/16")) for net in nets)


def test_mig_mixed_labels_match_allocatable():
    nodes = p.expand(*p.load_pools_doc(DEFAULT))
    mig = next(n for n in nodes if n.labels.get("nvidia.com/mig.strategy") == "mixed")
    assert mig.allocatable["nvidia.com/gpu"] == "0"  # every GPU partitioned
    for profile in ("1g.5gb", "2g.10gb", "3g.20gb"):
        assert mig.labels[f"nvidia.com/mig-{profile}.count"] == mig.allocatable[f"nvidia.com/mig-{profile}"]
        assert mig.labels[f"nvidia.com/mig-{profile}.product"] == f"NVIDIA-A100-SXM4-40GB-MIG-{profile}"
    assert mig.labels["nvidia.com/mig-1g.5gb.count"] == "16"
    whole = next(n for n in nodes if n.labels.get("nvidia.com/gpu.product") == "NVIDIA-H100-80GB-HBM3")
    assert whole.labels["nvidia.com/gpu.memory"] == "81559"
    assert whole.labels["nvidia.com/gpu.count"] == whole.allocatable["nvidia.com/gpu"] == "8"
    assert whole.labels["nvidia.com/mig.strategy"] == "none"


def test_node_manifest_carries_labels_capacity_and_pod_cidr():
    node = p.expand(*p.load_pools_doc(DEFAULT))[0]
    manifest = p.node_manifest(node)
    assert manifest["spec"]["podCIDR"] == node.pod_cidr
    assert manifest["status"]["allocatable"] == manifest["status"]["capacity"] == node.allocatable
    assert manifest["metadata"]["labels"]["kubernetes.io/hostname"] == node.name


@pytest.mark.parametrize("doc, error", [
    ("pools: []", "no pools"),
    ("pools: [{name: Bad_Name}]", "DNS label"),
    ("pools: [{name: a, agent: docker}]", "agent must be one of"),
    ("pools: [{name: a, gpu: {product: X}}]", "bad gpu entry"),
    ("pools: [{name: a, gpu: {product: X, memoryMiB: 1, count: 1, mig: {strategy: single}}}]", "not supported"),
    ("podCIDRFirstOctet: 0\npools: [{name: a}]", "podCIDRFirstOctet"),
])
def test_bad_pools_files_are_rejected_with_a_reason(tmp_path, doc, error):
    f = tmp_path / "pools.yaml"
    f.write_text(textwrap.dedent(doc))
    with pytest.raises(p.PoolsError, match=error):
        p.load_pools_doc(f)


def test_too_many_nodes_for_the_pod_network(tmp_path):
    f = tmp_path / "pools.yaml"
    f.write_text("podCIDRFirstOctet: 250\npools: [{name: a, nodes: 7}]")
    with pytest.raises(p.PoolsError, match="nodes fit"):
        p.expand(*p.load_pools_doc(f))
