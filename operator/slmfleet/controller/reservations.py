"""What a model's Deployments want of the GPUs and do not hold yet: reservations in the inventory.

A revision's Deployment at `replicas` wants that many pods of its placement (resource, product,
devices per pod, from the pod template's placement annotation); those bound to a node are counted
as they are (sizing.LiveInventory counts bound pods), the rest are reserved, so that models placed
at the same moment do not all count the same free devices. Kept from the operator's stores and
its own writes, whenever a model's Deployments or pods change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slmfleet.builders.labels import PLACEMENT_ANNOTATION, REVISION_LABEL
from slmfleet.controller.runtime import GPU_PREFIX, ModelKey, Runtime
from slmfleet.planning.common import on_its_node


def wanted_devices(deployments: list[dict[str, Any]], pods: list[dict[str, Any]]) -> dict[str, dict[tuple[str, str], int]]:
    """revision -> (resource, product) -> devices its Deployment wants for pods not bound yet."""
    # Counted by revision and placement: after a move, the pods still on the old placement hold
    # devices there, and the new placement's pods need their own.
    bound: dict[tuple[str, str], int] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        if on_its_node(pod):
            at = ((meta.get("labels") or {}).get(REVISION_LABEL, ""),
                  str((meta.get("annotations") or {}).get(PLACEMENT_ANNOTATION, "")))
            bound[at] = bound.get(at, 0) + 1
    out: dict[str, dict[tuple[str, str], int]] = {}
    for deployment in deployments:
        meta, spec = deployment.get("metadata") or {}, deployment.get("spec") or {}
        if meta.get("deletionTimestamp"):
            continue
        key = str(((spec.get("template") or {}).get("metadata") or {}).get("annotations", {}).get(PLACEMENT_ANNOTATION, ""))
        resource, _, rest = key.partition("|")
        product, _, count = rest.rpartition("|")
        if not resource.startswith(GPU_PREFIX) or not product or not count.isdigit():
            continue
        revision = (meta.get("labels") or {}).get(REVISION_LABEL, "")
        unbound = max(0, int(spec.get("replicas", 1) or 0) - bound.get((revision, key), 0))
        if unbound:
            out[revision] = {(resource, product): unbound * int(count)}
    return out


def refresh(runtime: Runtime, key: ModelKey, planned: Sequence[dict[str, Any]] = ()) -> int:
    """Bring the model's reservations up to date; by how many devices they grew (or shrank).

    `planned`: Deployments a plan is about to apply, reserved as if applied. Workers plan at the
    same time, and a plan's applies take a round trip: reserved only once applied, the last free
    device would be given to every model planned meanwhile. The caller refreshes again once the
    applies are done or failed."""
    deployments = runtime.writes.fresh("Deployment", key[0], list(runtime.indices["slm_deployments"].get(key, ())), key[1])
    names = {d["metadata"]["name"] for d in planned}
    deployments = [d for d in deployments if (d.get("metadata") or {}).get("name") not in names] + list(planned)
    pods = list(runtime.indices["slm_model_pods"].get(key, ()))
    return runtime.cluster.set_reservations(key, wanted_devices(deployments, pods))
