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
    process_gpu = [n for n in nodes if n.agent == "process" and "nvidia.com/gpu.product" in n.labels]
    assert len(process_gpu) == 2
    assert all(n.labels["nvidia.com/gpu.product"] == "NVIDIA-L4" and n.allocatable["nvidia.com/gpu"] == "1"
               for n in process_gpu)
    assert all(n.labels[p.AGENT_LABEL] == n.agent for n in nodes)


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n" \
          "processor\t: 1\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16\n"


def test_host_cpuid_names_the_flags_every_cpu_has_as_nfd_does():
    assert p.host_cpuid(CPUINFO) == ("AMXBF16", "AVX", "AVX2", "AVX512BF16", "AVX512F")
    assert p.host_cpuid("") == ()
    assert p.cpuid_labels(["AVX2"]) == {"feature.node.kubernetes.io/cpu-cpuid.AVX2": "true"}


def test_default_fleet_has_real_cpu_process_nodes_with_this_machines_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    nodes = p.load_nodes(DEFAULT, cpuinfo)
    cpu_process = [n for n in nodes if n.pool == "process-cpu"]
    assert [n.name for n in cpu_process] == ["process-cpu-0", "process-cpu-1"]
    for n in cpu_process:
        assert n.agent == "process" and n.labels[p.AGENT_LABEL] == "process"
        assert not any(k.startswith("nvidia.com/") for k in (*n.labels, *n.allocatable))
        assert n.allocatable["cpu"] == "2" and n.allocatable["memory"] == "8Gi"
        cpuid = {k.removeprefix(p.NFD_CPUID_PREFIX) for k, v in n.labels.items() if k.startswith(p.NFD_CPUID_PREFIX)}
        assert cpuid == {"AMXBF16", "AVX", "AVX2", "AVX512BF16", "AVX512F"}
        assert all(n.labels[p.NFD_CPUID_PREFIX + f] == "true" for f in cpuid)
    # The GPU process nodes run on this machine too: the same flags.
    l4 = next(n for n in nodes if n.pool == "process-l4")
    assert l4.labels[p.NFD_CPUID_PREFIX + "AMXBF16"] == "true"
    # The kwok CPU pool declares AVX-512 without bf16; GPU kwok pools declare nothing.
    kwok_cpu = next(n for n in nodes if n.pool == "cpu")
    assert kwok_cpu.labels[p.NFD_CPUID_PREFIX + "AVX2"] == kwok_cpu.labels[p.NFD_CPUID_PREFIX + "AVX512F"] == "true"
    assert p.NFD_CPUID_PREFIX + "AVX512BF16" not in kwok_cpu.labels and p.NFD_CPUID_PREFIX + "AMXBF16" not in kwok_cpu.labels
    h100 = next(n for n in nodes if n.pool == "h100-80gb")
    assert not any(k.startswith(p.NFD_CPUID_PREFIX) for k in h100.labels)
    # Apart from the process nodes' cpuid labels, the nodes are exactly the operator's expansion of the file.
    plain = p.expand(*p.load_pools_doc(DEFAULT))
    assert [(n.name, n.pod_cidr, n.allocatable) for n in nodes] == [(n.name, n.pod_cidr, n.allocatable) for n in plain]

    def without_cpuid(labels):
        return {k: v for k, v in labels.items() if not k.startswith(p.NFD_CPUID_PREFIX)}

    assert all(without_cpuid(n.labels) == without_cpuid(m.labels) for n, m in zip(nodes, plain, strict=True))
    assert all(n.labels == m.labels for n, m in zip(nodes, plain, strict=True) if n.agent == "kwok")


def test_the_real_host_cpu_flags_are_read():
    host = p.host_cpuid(Path("/proc/cpuinfo").read_text())
    node = next(n for n in p.load_nodes(DEFAULT) if n.pool == "process-cpu")
    assert {k for k in node.labels if k.startswith(p.NFD_CPUID_PREFIX)} == set(p.cpuid_labels(host))


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
    ("podCIDRFirstOctet: x\npools: [{name: a}]", "podCIDRFirstOctet must be a number"),
    ("podCIDRRange: 127.112.0.0/14\npodCIDRFirstOctet: 64\npools: [{name: a}]", "not both"),
    ("podCIDRRange: 10.0.0.0/14\npools: [{name: a}]", "inside 127.0.0.0/8"),
    ("podCIDRRange: 127.0.0.0/12\npools: [{name: a}]", "overlaps 127.0.0.0/16"),
    ("podCIDRRange: 127.112.0.1/14\npools: [{name: a}]", "host bits zero"),
    ("podCIDRRange: nonsense\npools: [{name: a}]", "not an IPv4 network"),
    ("podCIDRRange: 127.112.0.0/20\npools: [{name: a}]", "too small"),
    ("pools: [{name: a, cpuid: AVX2}]", "cpuid must be a list"),
    ("pools: [{name: a, cpuid: [AVX2, avx512f]}]", "as NFD spells them"),
    ("pools: [{name: a, agent: process, cpuid: [AVX2]}]", "process nodes carry this machine"),
])
def test_bad_pools_files_are_rejected_with_a_reason(tmp_path, doc, error):
    f = tmp_path / "pools.yaml"
    f.write_text(textwrap.dedent(doc))
    with pytest.raises(p.PoolsError, match=error):
        p.load_nodes(f)


def test_too_many_nodes_for_the_pod_network(tmp_path):
    f = tmp_path / "pools.yaml"
    f.write_text("podCIDRFirstOctet: 250\npools: [{name: a, nodes: 7}]")
    with pytest.raises(p.PoolsError, match="nodes fit"):
        p.expand(*p.load_pools_doc(f))


def test_a_pod_cidr_range_holds_hundreds_of_nodes(tmp_path):
    f = tmp_path / "pools.yaml"
    f.write_text("podCIDRRange: 127.200.0.0/15\npools: [{name: a, nodes: 495}]")
    _, network = p.load_pools_doc(f)
    nodes = p.load_nodes(f)
    nets = [ipaddress.IPv4Network(n.pod_cidr) for n in nodes]
    pod_range = ipaddress.IPv4Network("127.200.0.0/15")
    service = ipaddress.IPv4Network(network.service_cidr)
    fallback = ipaddress.IPv4Network(network.fallback_cidr, strict=False)
    assert len(set(nets)) == 495 and all(net.prefixlen == 24 and net.subnet_of(pod_range) for net in nets)
    assert service == ipaddress.IPv4Network("127.200.0.0/20") and network.first_service_ip == "127.200.0.1"
    assert fallback == ipaddress.IPv4Network("127.200.16.0/24") and network.fallback_cidr == "127.200.16.1/24"
    assert nets[0] == ipaddress.IPv4Network("127.200.17.0/24") and nets[-1] == ipaddress.IPv4Network("127.201.255.0/24")
    assert not any(net.overlaps(service) or net.overlaps(fallback) for net in nets)
    f.write_text("podCIDRRange: 127.200.0.0/15\npools: [{name: a, nodes: 496}]")
    with pytest.raises(p.PoolsError, match="at most 495 nodes fit"):
        p.load_nodes(f)


def test_the_octet_layout_is_unchanged():
    network = p.PodNetwork.legacy(64)
    assert [network.node_cidr(k) for k in (0, 1, 191)] == ["127.64.0.0/24", "127.65.0.0/24", "127.255.0.0/24"]
    assert network.service_cidr == "127.62.0.0/16" and network.first_service_ip == "127.62.0.1"
    assert network.fallback_cidr == "127.63.0.1/24" and network.capacity == 192
    assert p.expand(*p.load_pools_doc(DEFAULT)) == p.expand(p.load_pools_doc(DEFAULT)[0], 64)
