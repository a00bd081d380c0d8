"""Pools documents: a GPU fleet described by pools of identical nodes, turned into Node objects.

Used by the local cluster (e2e/pools.py reads the file) and by `slmfleet size --pools` to size
against a fleet without a cluster. GPU labels follow NVIDIA GPU Feature Discovery
(`nvidia.com/gpu.product`, `nvidia.com/gpu.memory` in MiB, `nvidia.com/gpu.count`,
`nvidia.com/mig.strategy`, and per MIG profile `nvidia.com/mig-<profile>.{count,memory,product,
multiprocessors}` under the mixed strategy), and the allocatable resources match them: whole GPUs
as `nvidia.com/gpu`, MIG slices as `nvidia.com/mig-<profile>`. Every node gets a /24 pod CIDR
inside 127.0.0.0/8, so every pod IP (simulated or real) is a loopback address.
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


def parse_pools_doc(doc: Mapping[str, Any] | None, source: str = "pools document") -> tuple[list[Pool], int]:
    """The pools and the first octet of the pod network (127.<octet + k>.0.0/24 for node k);
    a second cluster on the same machine picks a different `podCIDRFirstOctet`."""
    doc = doc or {}
    if not isinstance(doc, Mapping):
        raise PoolsError(f"{source}: must be a mapping with a `pools` list")
    octet = int(doc.get("podCIDRFirstOctet", POD_CIDR_FIRST_OCTET))
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
    if not 16 <= octet <= 250:
        raise PoolsError(f"{source}: podCIDRFirstOctet must be within 16..250")
    return pools, octet


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


def expand(pools: list[Pool], first_octet: int = POD_CIDR_FIRST_OCTET) -> list[NodeSpec]:
    nodes: list[NodeSpec] = []
    for pool in pools:
        for i in range(pool.nodes):
            k = len(nodes)
            if first_octet + k > 255:
                raise PoolsError(f"at most {256 - first_octet} nodes fit in the loopback pod CIDRs")
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
                    pod_cidr=f"127.{first_octet + k}.0.0/24",
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
