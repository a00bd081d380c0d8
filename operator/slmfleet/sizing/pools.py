"""Pools documents: a GPU fleet described by pools of identical nodes, turned into Node objects.

Used by the local cluster (e2e/pools.py reads the file) and by `slmfleet size --pools` to size
against a fleet without a cluster. GPU labels follow NVIDIA GPU Feature Discovery
(`nvidia.com/gpu.product`, `nvidia.com/gpu.memory` in MiB, `nvidia.com/gpu.count`,
`nvidia.com/mig.strategy`, and per MIG profile `nvidia.com/mig-<profile>.{count,memory,product,
multiprocessors}` under the mixed strategy), and the allocatable resources match them: whole GPUs
as `nvidia.com/gpu`, MIG slices as `nvidia.com/mig-<profile>`. Every node gets a /24 pod CIDR
inside 127.0.0.0/8, so every pod IP (simulated or real) is a loopback address.

Where a cluster's addresses come from (its `PodNetwork`), one of two keys of the pools document:
- `podCIDRRange: 127.112.0.0/14` (any loopback network of prefix /9 to /19 outside 127.0.0.0/16,
  where the control plane listens): the Service CIDR is its first /20 (4094 ClusterIPs), kwok's
  fallback pod CIDR the /24 after it, and node k the k-th /24 after that, so a /15 holds 495
  nodes and a /14 1007. Everything of a cluster lies in this one range: a second cluster on the
  same machine takes a range that does not overlap it.
- `podCIDRFirstOctet: 64` (the default when neither is given): node k gets 127.<octet + k>.0.0/24,
  the Service CIDR is 127.<octet - 2>.0.0/16 and kwok's fallback 127.<octet - 1>.0.0/24; at most
  256 - octet nodes. A second cluster picks an octet whose 127.<octet - 2> .. 127.<octet + nodes - 1>
  do not overlap the first's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

AGENT_LABEL = "slmfleet.io/node-agent"
AGENTS = ("kwok", "process")
# Node k gets 127.(POD_CIDR_FIRST_OCTET + k).0.0/24, away from 127.0.0.0/16 where the control plane listens.
POD_CIDR_FIRST_OCTET = 64
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
CONTROL_PLANE = ipaddress.IPv4Network("127.0.0.0/16")  # the control plane and the tests' servers
RANGE_SERVICE_PREFIX = 20  # a podCIDRRange's Service CIDR: its first /20
RANGE_MAX_PREFIX = 19  # room for the Service CIDR, kwok's fallback and at least 15 nodes


class PoolsError(ValueError):
    pass


@dataclass(frozen=True)
class MigProfile:
    name: str  # e.g. "1g.5gb"
    per_gpu: int
    memory_mib: int
    multiprocessors: int


@dataclass(frozen=True)
class Gpu:
    product: str
    memory_mib: int
    count: int
    family: str
    compute_major: int
    compute_minor: int
    mig_strategy: str = "none"
    partitioned_gpus: int = 0
    mig_profiles: tuple[MigProfile, ...] = ()


@dataclass(frozen=True)
class Pool:
    name: str
    nodes: int
    agent: str
    cpu: str
    memory: str
    gpu: Gpu | None
    cpuid: tuple[str, ...] = ()  # CPU features, labelled as Node Feature Discovery does


@dataclass(frozen=True)
class NodeSpec:
    name: str
    pool: str
    agent: str
    pod_cidr: str
    labels: dict[str, str] = field(hash=False)
    allocatable: dict[str, str] = field(hash=False)

    @property
    def pod_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.pod_cidr)


@dataclass(frozen=True)
class PodNetwork:
    """A cluster's loopback addresses: node pod CIDRs, the Service CIDR and kwok's fallback pod
    CIDR (for a node without one; every node here has one). Build with `legacy` or `from_range`."""

    first_octet: int | None = None  # `podCIDRFirstOctet` layout
    pod_range: ipaddress.IPv4Network | None = None  # `podCIDRRange` layout

    @classmethod
    def legacy(cls, first_octet: int = POD_CIDR_FIRST_OCTET, source: str = "pools document") -> PodNetwork:
        if not 16 <= first_octet <= 250:
            raise PoolsError(f"{source}: podCIDRFirstOctet must be within 16..250")
        return cls(first_octet=first_octet)

    @classmethod
    def from_range(cls, text: Any, source: str = "pools document") -> PodNetwork:
        try:
            net = ipaddress.IPv4Network(str(text), strict=True)
        except ValueError as exc:
            raise PoolsError(f"{source}: podCIDRRange {text!r} is not an IPv4 network address/prefix "
                             f"with its host bits zero (e.g. 127.112.0.0/14): {exc}") from exc
        if not net.subnet_of(LOOPBACK):
            raise PoolsError(f"{source}: podCIDRRange {net} must lie inside 127.0.0.0/8: "
                             "every pod IP and ClusterIP of the local cluster is a loopback address")
        if net.overlaps(CONTROL_PLANE):
            raise PoolsError(f"{source}: podCIDRRange {net} overlaps 127.0.0.0/16, where the control plane listens")
        if net.prefixlen > RANGE_MAX_PREFIX:
            raise PoolsError(f"{source}: podCIDRRange {net} is too small: at most /{RANGE_MAX_PREFIX} "
                             f"(its first /{RANGE_SERVICE_PREFIX} is the Service CIDR, then kwok's fallback /24, "
                             "then one /24 per node)")
        return cls(pod_range=net)

    @property
    def _base(self) -> int:
        assert self.pod_range is not None
        return int(self.pod_range.network_address)

    @property
    def _reserved(self) -> int:
        """/24s at the start of a range before the first node's: the Service CIDR, kwok's fallback."""
        return (1 << (24 - RANGE_SERVICE_PREFIX)) + 1

    @property
    def capacity(self) -> int:
        """How many nodes get a pod CIDR."""
        if self.pod_range is None:
            return 256 - int(self.first_octet or 0)
        return (1 << (24 - self.pod_range.prefixlen)) - self._reserved

    def node_cidr(self, k: int) -> str:
        if not 0 <= k < self.capacity:
            raise PoolsError(f"at most {self.capacity} nodes fit in the loopback pod CIDRs "
                             f"({self.describe()}); give the pools document a larger podCIDRRange "
                             "(e.g. 127.112.0.0/14 for 1007 nodes)")
        if self.pod_range is None:
            return f"127.{int(self.first_octet or 0) + k}.0.0/24"
        return f"{ipaddress.IPv4Address(self._base + (self._reserved + k) * 256)}/24"

    @property
    def service_cidr(self) -> str:
        """The Service CIDR (ClusterIPs), loopback and apart from every pod CIDR."""
        if self.pod_range is None:
            return f"127.{int(self.first_octet or 0) - 2}.0.0/16"
        return f"{self.pod_range.network_address}/{RANGE_SERVICE_PREFIX}"

    @property
    def first_service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP (the API server's certificate names it)."""
        return str(ipaddress.IPv4Network(self.service_cidr).network_address + 1)

    @property
    def fallback_cidr(self) -> str:
        """kwok's pool for a node without a podCIDR (`--cidr`, as its first host/prefix)."""
        if self.pod_range is None:
            return f"127.{int(self.first_octet or 0) - 1}.0.1/24"
        return f"{ipaddress.IPv4Address(self._base + (self._reserved - 1) * 256 + 1)}/24"

    def describe(self) -> str:
        if self.pod_range is None:
            return f"podCIDRFirstOctet {self.first_octet}: 127.{self.first_octet}.0.0/24 and up, one /16 per node"
        return f"podCIDRRange {self.pod_range}"


def pod_network(net: PodNetwork | int) -> PodNetwork:
    """A PodNetwork, or the legacy layout of a bare first octet (what `expand` took before)."""
    return net if isinstance(net, PodNetwork) else PodNetwork.legacy(int(net))


def _gpu(raw: Mapping[str, Any], pool: str) -> Gpu:
    try:
        mig = raw.get("mig") or {}
        profiles = tuple(
            MigProfile(name, int(p["perGPU"]), int(p["memoryMiB"]), int(p.get("multiprocessors", 0)))
            for name, p in sorted((mig.get("profiles") or {}).items())
        )
        gpu = Gpu(
            product=str(raw["product"]),
            memory_mib=int(raw["memoryMiB"]),
            count=int(raw["count"]),
            family=str(raw.get("family", "")),
            compute_major=int(raw.get("computeMajor", 0)),
            compute_minor=int(raw.get("computeMinor", 0)),
            mig_strategy=str(mig.get("strategy", "none")),
            partitioned_gpus=int(mig.get("partitionedGPUs", 0)),
            mig_profiles=profiles,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise PoolsError(f"pool {pool!r}: bad gpu entry: {exc!r}") from exc
    if gpu.mig_strategy not in ("none", "mixed"):
        raise PoolsError(f"pool {pool!r}: mig strategy {gpu.mig_strategy!r} not supported (none, mixed)")
    if not 0 <= gpu.partitioned_gpus <= gpu.count:
        raise PoolsError(f"pool {pool!r}: partitionedGPUs must be between 0 and count")
    if gpu.partitioned_gpus and not gpu.mig_profiles:
        raise PoolsError(f"pool {pool!r}: partitioned GPUs need MIG profiles")
    return gpu


def parse_pools_doc(doc: Mapping[str, Any] | None, source: str = "pools document") -> tuple[list[Pool], PodNetwork]:
    """The pools and the cluster's pod network (`podCIDRRange` or `podCIDRFirstOctet`, see the
    module's docstring); a second cluster on the same machine picks addresses apart from the first's."""
    doc = doc or {}
    if not isinstance(doc, Mapping):
        raise PoolsError(f"{source}: must be a mapping with a `pools` list")
    network = _network(doc, source)
    pools = []
    for raw in doc.get("pools") or []:
        if not isinstance(raw, Mapping):
            raise PoolsError(f"{source}: every pool must be a mapping, not {raw!r}")
        name = str(raw.get("name", ""))
        if not name or not name.replace("-", "").isalnum() or name != name.lower():
            raise PoolsError(f"pool name {name!r} must be a lowercase DNS label")
        agent = str(raw.get("agent", "kwok"))
        if agent not in AGENTS:
            raise PoolsError(f"pool {name!r}: agent must be one of {AGENTS}, not {agent!r}")
        pools.append(
            Pool(
                name=name,
                nodes=int(raw.get("nodes", 1)),
                agent=agent,
                cpu=str(raw.get("cpu", 8)),
                memory=str(raw.get("memory", "32Gi")),
                gpu=_gpu(raw["gpu"], name) if raw.get("gpu") else None,
                cpuid=_cpuid(raw.get("cpuid"), name),
            )
        )
    if not pools:
        raise PoolsError(f"{source}: no pools")
    return pools, network


def _network(doc: Mapping[str, Any], source: str) -> PodNetwork:
    if "podCIDRRange" in doc and "podCIDRFirstOctet" in doc:
        raise PoolsError(f"{source}: give podCIDRRange or podCIDRFirstOctet, not both")
    if "podCIDRRange" in doc:
        return PodNetwork.from_range(doc["podCIDRRange"], source)
    raw = doc.get("podCIDRFirstOctet", POD_CIDR_FIRST_OCTET)
    try:
        octet = int(raw)
    except (TypeError, ValueError) as exc:
        raise PoolsError(f"{source}: podCIDRFirstOctet must be a number within 16..250, not {raw!r}") from exc
    return PodNetwork.legacy(octet, source)


def _cpuid(raw: Any, pool: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(f, str) and f.isalnum() and f == f.upper() for f in raw):
        raise PoolsError(f"pool {pool!r}: cpuid must be a list of CPUID feature names as NFD spells them "
                         f"(AVX2, AVX512F, AVX512BF16, AMXBF16, ...)")
    return tuple(sorted(set(raw)))


def cpuid_labels(features: tuple[str, ...]) -> dict[str, str]:
    """Node Feature Discovery's CPU feature labels: feature.node.kubernetes.io/cpu-cpuid.<FEATURE>=true."""
    return {f"feature.node.kubernetes.io/cpu-cpuid.{f}": "true" for f in features}


def gpu_labels(gpu: Gpu) -> dict[str, str]:
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": gpu.product,
        "nvidia.com/gpu.memory": str(gpu.memory_mib),
        "nvidia.com/gpu.count": str(gpu.count),
        "nvidia.com/gpu.family": gpu.family,
        "nvidia.com/gpu.compute.major": str(gpu.compute_major),
        "nvidia.com/gpu.compute.minor": str(gpu.compute_minor),
        "nvidia.com/gpu.machine": "slmfleet-simulated",
        "nvidia.com/mig.capable": str(bool(gpu.mig_profiles) or "A100" in gpu.product or "H100" in gpu.product).lower(),
        "nvidia.com/mig.strategy": gpu.mig_strategy,
    }
    for profile in gpu.mig_profiles:
        prefix = f"nvidia.com/mig-{profile.name}"
        labels[f"{prefix}.count"] = str(profile.per_gpu * gpu.partitioned_gpus)
        labels[f"{prefix}.memory"] = str(profile.memory_mib)
        labels[f"{prefix}.product"] = f"{gpu.product}-MIG-{profile.name}"
        labels[f"{prefix}.multiprocessors"] = str(profile.multiprocessors)
    return labels


def gpu_allocatable(gpu: Gpu) -> dict[str, str]:
    alloc = {"nvidia.com/gpu": str(gpu.count - gpu.partitioned_gpus)}
    for profile in gpu.mig_profiles:
        alloc[f"nvidia.com/mig-{profile.name}"] = str(profile.per_gpu * gpu.partitioned_gpus)
    return alloc


def expand(pools: list[Pool], network: PodNetwork | int = POD_CIDR_FIRST_OCTET) -> list[NodeSpec]:
    """Every node of the pools, node k with the k-th pod CIDR of `network` (a bare int is a
    `podCIDRFirstOctet`)."""
    net = pod_network(network)
    if sum(pool.nodes for pool in pools) > net.capacity:
        raise PoolsError(f"{sum(pool.nodes for pool in pools)} nodes, but at most {net.capacity} nodes fit "
                         f"in the loopback pod CIDRs ({net.describe()}); give the pools document a larger "
                         "podCIDRRange (e.g. 127.112.0.0/14 for 1007 nodes)")
    nodes: list[NodeSpec] = []
    for pool in pools:
        for i in range(pool.nodes):
            k = len(nodes)
            labels = {
                "kubernetes.io/hostname": f"{pool.name}-{i}",
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": pool.name,
                "slmfleet.io/pool": pool.name,
                AGENT_LABEL: pool.agent,
            }
            alloc = {"cpu": pool.cpu, "memory": pool.memory, "pods": "110", "ephemeral-storage": "500Gi"}
            labels |= cpuid_labels(pool.cpuid)
            if pool.gpu:
                labels |= gpu_labels(pool.gpu)
                alloc |= gpu_allocatable(pool.gpu)
            nodes.append(
                NodeSpec(
                    name=f"{pool.name}-{i}",
                    pool=pool.name,
                    agent=pool.agent,
                    pod_cidr=net.node_cidr(k),
                    labels=labels,
                    allocatable=alloc,
                )
            )
    return nodes


def node_manifest(node: NodeSpec) -> dict[str, Any]:
    """The Node object as registered; kwok or the node agent fills in conditions afterwards."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": dict(node.labels),
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
        "status": {
            "capacity": dict(node.allocatable),
            "allocatable": dict(node.allocatable),
        },
    }


def ready_nodes_from_pools_doc(doc: Mapping[str, Any] | None, source: str = "pools document") -> list[dict[str, Any]]:
    """Every node of the fleet as a running cluster reports it: registered and Ready, nothing allocated."""
    nodes = []
    for spec in expand(*parse_pools_doc(doc, source)):
        node = node_manifest(spec)
        node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        nodes.append(node)
    return nodes
