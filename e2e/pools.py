"""Pools files: the simulated fleet of the local cluster, turned into Node objects.

The parsing and the GPU Feature Discovery labels live in `slmfleet.sizing.pools` (so that
`slmfleet size --pools` sizes against exactly the nodes this cluster registers); this module reads
the YAML file and re-exports the rest.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from slmfleet.sizing.pools import (
    AGENT_LABEL,
    AGENTS,
    POD_CIDR_FIRST_OCTET,
    Gpu,
    MigProfile,
    NodeSpec,
    Pool,
    PoolsError,
    expand,
    gpu_allocatable,
    gpu_labels,
    node_manifest,
    parse_pools_doc,
)

__all__ = [
    "AGENT_LABEL", "AGENTS", "POD_CIDR_FIRST_OCTET", "Gpu", "MigProfile", "NodeSpec", "Pool", "PoolsError",
    "expand", "gpu_allocatable", "gpu_labels", "load_pools_doc", "node_manifest",
]


def load_pools_doc(path: Path) -> tuple[list[Pool], int]:
    """The pools and the first octet of the pod network (127.<octet + k>.0.0/24 for node k);
    a second cluster on the same machine picks a different `podCIDRFirstOctet`."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise PoolsError(f"{path}: not YAML: {exc}") from exc
    return parse_pools_doc(doc, str(path))
