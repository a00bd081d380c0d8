"""The canary's traffic split as a Gateway API HTTPRoute: one rule whose backendRefs are the
stable and the candidate revision Services, weighted. The route is the model's (named after it)
and owned by it; promotion and rollback only change the weights."""

from __future__ import annotations

from typing import Any

from slmfleet.api.config import OperatorConfig
from slmfleet.api.modelrollout import HttpRouteTraffic
from slmfleet.builders.labels import model_labels
from slmfleet.builders.names import model_service_name, revision_object_name
from slmfleet.builders.owner import ModelOwner

HTTPROUTE_API_VERSION = "gateway.networking.k8s.io/v1"


def build_http_route(owner: ModelOwner, traffic: HttpRouteTraffic, stable_revision: str,
                     candidate_revision: str | None, canary_weight: int, config: OperatorConfig) -> dict[str, Any]:
    """Weights are percentages: stable 100 - w, candidate w. Without a candidate all traffic goes
    to the stable (a backendRef of weight 0 would still be listed, and some gateways warn on it)."""
    if not 0 <= canary_weight <= 100:
        raise ValueError(f"canary weight {canary_weight} is not a percentage")
    backends = [_backend(owner, stable_revision, 100 - (canary_weight if candidate_revision else 0), config)]
    if candidate_revision:
        backends.append(_backend(owner, candidate_revision, canary_weight, config))
    spec: dict[str, Any] = {
        "parentRefs": [dict(sorted(ref.items())) for ref in traffic.parent_refs],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": backends}],
    }
    if traffic.hostnames:
        spec["hostnames"] = list(traffic.hostnames)
    return {
        "apiVersion": HTTPROUTE_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": {
            "name": model_service_name(owner.name),
            "namespace": owner.namespace,
            "labels": model_labels(owner.name),
            "ownerReferences": [owner.owner_reference()],
        },
        "spec": spec,
    }


def _backend(owner: ModelOwner, revision: str, weight: int, config: OperatorConfig) -> dict[str, Any]:
    return {"group": "", "kind": "Service", "name": revision_object_name(owner.name, revision),
            "port": config.vllm_port, "weight": weight}


def route_weight_of(route: dict[str, Any] | None, owner: ModelOwner, candidate_revision: str) -> int | None:
    """The weight a live HTTPRoute gives the candidate revision's Service (0 when it has no such
    backend; None without a route)."""
    if route is None:
        return None
    wanted = revision_object_name(owner.name, candidate_revision)
    for rule in (route.get("spec") or {}).get("rules") or []:
        for ref in rule.get("backendRefs") or []:
            if ref.get("name") == wanted:
                return int(ref.get("weight", 1))
    return 0


def replica_ratio_replicas(stable_replicas: int, weight: int) -> int:
    """Candidate replicas for `weight` percent in replica-ratio mode, where the model Service spreads
    requests evenly over the ready pods of both revisions: w / (100 - w) of the stable's replicas,
    at least 1 (the evaluations need a pod even at 0%) and at most the stable's count, so a canary
    never costs more GPUs than the stable. The share is therefore quantised by the replica counts
    (1 stable replica: any weight in (0, 100) is 50%); the HTTPRoute mode has exact weights."""
    if not 0 <= weight <= 100:
        raise ValueError(f"canary weight {weight} is not a percentage")
    top = max(stable_replicas, 1)
    if weight >= 100:
        return top
    return min(top, max(1, round(stable_replicas * weight / (100 - weight))))
