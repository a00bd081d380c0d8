"""Node and Pod dicts as the API server returns them, for the sizing tests (not a test module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from slmfleet.sizing.pools import ready_nodes_from_pools_doc

DEFAULT_POOLS = Path(__file__).resolve().parents[1] / "e2e" / "pools" / "default.yaml"


def default_fleet() -> list[dict[str, Any]]:
    return ready_nodes_from_pools_doc(yaml.safe_load(DEFAULT_POOLS.read_text()))


def gpu_node(name: str, product: str, memory_mib: int, count: int, *, ready: bool = True,
             unschedulable: bool = False, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name,
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.memory": str(memory_mib),
            "nvidia.com/gpu.count": str(count),
            "nvidia.com/mig.strategy": "none",
            **(labels or {}),
        }},
        "spec": {"unschedulable": True} if unschedulable else {},
        "status": {
            "allocatable": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": str(count)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def gpu_pod(node: str | None, gpus: int, *, phase: str = "Running", resource: str = "nvidia.com/gpu",
            limits_only: bool = False, uid: str = "", init: int = 0) -> dict[str, Any]:
    want = {resource: str(gpus)}
    resources = {"limits": want} if limits_only else {"requests": want, "limits": want}
    spec: dict[str, Any] = {"containers": [{"name": "vllm", "resources": resources}]}
    if node:
        spec["nodeName"] = node
    if init:
        spec["initContainers"] = [{"name": "load", "resources": {"limits": {resource: str(init)}}}]
    return {"metadata": {"name": f"p-{uid}", "uid": uid}, "spec": spec, "status": {"phase": phase}}
