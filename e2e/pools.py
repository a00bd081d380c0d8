"""Pools files: the simulated fleet of the local cluster, turned into Node objects.

The parsing and the GPU Feature Discovery labels live in `slmfleet.sizing.pools` (so that
`slmfleet size --pools` sizes against exactly the nodes this cluster registers); this module reads
the YAML file and re-exports the rest.

CPU features, as Node Feature Discovery labels them (`feature.node.kubernetes.io/cpu-cpuid.<FLAG>:
"true"`), are added here: a kwok pool declares the flags of its simulated CPUs (`cpuid: [AVX2,
AVX512F]`, which the operator's pools parser also reads); a process pool's nodes run their pods on
this machine, so they carry the flags of this machine's CPU (/proc/cpuinfo), true of the host that
runs the pods, and may declare none (`slmfleet size --pools`, which reads only the file, does not
see a process pool's flags).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from slmfleet.sizing.pools import (
    AGENT_LABEL,
    AGENTS,
    POD_CIDR_FIRST_OCTET,
    Gpu,
    MigProfile,
    NodeSpec,
    PodNetwork,
    Pool,
    PoolsError,
    expand,
    gpu_allocatable,
    gpu_labels,
    node_manifest,
    parse_pools_doc,
    pod_network,
)

__all__ = [
    "AGENT_LABEL", "AGENTS", "CPUID_FLAGS", "NFD_CPUID_PREFIX", "POD_CIDR_FIRST_OCTET", "Gpu", "MigProfile",
    "NodeSpec", "PodNetwork", "Pool", "PoolsError", "cpuid_labels", "expand", "expand_with_cpuid", "gpu_allocatable",
    "gpu_labels", "host_cpuid", "load_nodes", "load_pools_doc", "node_manifest", "pod_network", "pool_cpuids",
]

NFD_CPUID_PREFIX = "feature.node.kubernetes.io/cpu-cpuid."
# /proc/cpuinfo flag -> NFD's cpuid feature name, for the instruction sets a CPU inference runtime
# chooses by (vLLM's CPU backend: AVX2 at least, AVX-512, bf16 in AVX-512 or AMX).
CPUID_FLAGS: dict[str, str] = {
    "avx": "AVX",
    "avx2": "AVX2",
    "fma": "FMA3",
    "avx_vnni": "AVXVNNI",
    "avx512f": "AVX512F",
    "avx512bw": "AVX512BW",
    "avx512vl": "AVX512VL",
    "avx512_vnni": "AVX512VNNI",
    "avx512_bf16": "AVX512BF16",
    "avx512_fp16": "AVX512FP16",
    "amx_bf16": "AMXBF16",
    "amx_int8": "AMXINT8",
    "amx_tile": "AMXTILE",
}
CPUINFO = Path("/proc/cpuinfo")


def host_cpuid(cpuinfo_text: str) -> tuple[str, ...]:
    """The NFD cpuid names of the flags every CPU of a /proc/cpuinfo lists, sorted."""
    per_cpu = [set(line.split(":", 1)[1].split()) for line in cpuinfo_text.splitlines()
               if line.split(":", 1)[0].strip() == "flags" and ":" in line]
    common = set.intersection(*per_cpu) if per_cpu else set()
    return tuple(sorted(CPUID_FLAGS[f] for f in common if f in CPUID_FLAGS))


def cpuid_labels(flags: Iterable[str]) -> dict[str, str]:
    return {NFD_CPUID_PREFIX + flag: "true" for flag in sorted(flags)}


def pool_cpuids(doc: Mapping[str, Any] | None, host: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Pool name -> its nodes' cpuid flags: declared (`cpuid`) for kwok pools, `host` for process pools."""
    out: dict[str, tuple[str, ...]] = {}
    raws = (doc.get("pools") or []) if isinstance(doc, Mapping) else []
    for raw in raws:
        if not isinstance(raw, Mapping):
            continue  # parse_pools_doc names the error
        name, agent, declared = str(raw.get("name", "")), str(raw.get("agent", "kwok")), raw.get("cpuid")
        if agent == "process":
            if declared is not None:
                raise PoolsError(f"pool {name!r}: process nodes carry this machine's CPU flags (/proc/cpuinfo); "
                                 "`cpuid` is for kwok pools")
            out[name] = tuple(sorted(host))
            continue
        if declared is None:
            out[name] = ()
            continue
        if not isinstance(declared, list) or not all(isinstance(f, str) and f.isalnum() and f == f.upper()
                                                     for f in declared):
            raise PoolsError(f"pool {name!r}: cpuid must be a list of CPUID feature names as NFD spells them "
                             "(AVX2, AVX512F, AVX512BF16, AMXBF16, ...)")
        out[name] = tuple(sorted(set(declared)))
    return out


def expand_with_cpuid(doc: Mapping[str, Any] | None, host: Iterable[str], source: str = "pools document") -> list[NodeSpec]:
    """The nodes of a pools document, with their NFD cpuid labels."""
    pools, network = parse_pools_doc(doc, source)
    cpuids = pool_cpuids(doc, host)
    return [dataclasses.replace(n, labels={**n.labels, **cpuid_labels(cpuids.get(n.pool, ()))})
            for n in expand(pools, network)]


def _read_doc(path: Path) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise PoolsError(f"{path}: not YAML: {exc}") from exc


def load_pools_doc(path: Path) -> tuple[list[Pool], PodNetwork]:
    """The pools and the cluster's pod network (`podCIDRRange`, or `podCIDRFirstOctet`: see
    slmfleet.sizing.pools); a second cluster on the same machine takes addresses apart from the first's."""
    return parse_pools_doc(_read_doc(path), str(path))


def load_nodes(path: Path, cpuinfo: Path = CPUINFO) -> list[NodeSpec]:
    """The nodes the cluster registers for a pools file: as `expand`, plus NFD cpuid labels (a
    process pool's from this machine's `cpuinfo`)."""
    return expand_with_cpuid(_read_doc(path), host_cpuid(cpuinfo.read_text()), str(path))
