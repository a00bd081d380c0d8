"""What the planners share: parsing a CR once, reading owned objects, the applied-hash diff."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from slmfleet.api.smallmodel import SmallModel
from slmfleet.builders.applied_hash import APPLIED_HASH
from slmfleet.builders.labels import REVISION_LABEL


@dataclass(frozen=True)
class InvalidSpec:
    """A CR the schema let through that the operator's model refuses (stored before a schema
    change, or a rule only the model checks): what is wrong, field by field."""

    message: str


def validation_message(exc: ValidationError, limit: int = 5) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:limit])


def parse_model(body: dict[str, Any]) -> SmallModel | InvalidSpec:
    try:
        return SmallModel.model_validate(body)
    except ValidationError as exc:
        return InvalidSpec(validation_message(exc))


@dataclass(frozen=True)
class Failure:
    """Why the model cannot get what its spec asks for (yet), as its conditions say it.
    `permanent`: retrying does not help (the weights fail their pin), so a rollout of it fails."""

    reason: str
    message: str
    permanent: bool = False
    degraded: bool = True  # False: a wait that is part of the work (the weights being read)
    names_taken: bool = False  # another owner's object has one of the model's names: apply nothing


@dataclass(frozen=True)
class EventNote:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Deletion:
    api_version: str
    kind: str
    name: str
    uid: str


def revision_of_object(obj: dict[str, Any]) -> str | None:
    return (obj.get("metadata", {}).get("labels") or {}).get(REVISION_LABEL)


def on_its_node(pod: dict[str, Any]) -> bool:
    """Whether the pod is bound to a node, not finished and not being deleted."""
    return bool((pod.get("spec") or {}).get("nodeName")) and not (pod.get("metadata") or {}).get("deletionTimestamp") \
        and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def ready_replicas(dep: dict[str, Any] | None) -> int:
    return int(((dep or {}).get("status") or {}).get("readyReplicas", 0))


def deployment_ready(dep: dict[str, Any] | None, desired: dict[str, Any] | None) -> bool:
    """The Deployment runs exactly the desired template (any, without one) and all its replicas
    are ready."""
    if dep is None:
        return False
    meta, spec, status = dep.get("metadata", {}), dep.get("spec", {}), dep.get("status") or {}
    if desired is not None and (meta.get("annotations") or {}).get(APPLIED_HASH) != (
        desired["metadata"]["annotations"][APPLIED_HASH]
    ):
        return False
    if status.get("observedGeneration", 0) < meta.get("generation", 0):
        return False
    replicas = spec.get("replicas", 1)
    return bool(
        status.get("updatedReplicas", 0) >= replicas
        and status.get("readyReplicas", 0) >= replicas
        and status.get("replicas", 0) == replicas
    )


def changed(desired: Iterable[dict[str, Any]], live: Iterable[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The desired objects whose live version was applied from something else (by applied hash),
    or changed since by another writer in a field the operator sets (`drifted`)."""
    by_key = {(o["kind"], o["metadata"]["name"]): o for o in live if o is not None}
    out = []
    for o in desired:
        current = by_key.get((o["kind"], o["metadata"]["name"]))
        hash_ = ((current or {}).get("metadata", {}).get("annotations") or {}).get(APPLIED_HASH)
        if current is None or hash_ != o["metadata"]["annotations"][APPLIED_HASH] or drifted(o, current):
            out.append(o)
    return out


def drifted(desired: dict[str, Any], live: dict[str, Any]) -> bool:
    """Whether another writer (a `kubectl scale`, an edit, a second controller) changed a field the
    operator sets but left the applied hash as it was: the replicas, the labels and annotations it
    set, the pod template's labels and its containers' names, images, commands and args. These the
    API server stores as sent (no defaulting, no normalising), so a plain comparison holds; the
    rest of an object is judged by its hash alone."""

    def sub(want: dict[str, Any] | None, have: dict[str, Any] | None) -> bool:
        have = have or {}
        return all(have.get(k) == v for k, v in (want or {}).items())

    d_meta, l_meta = desired.get("metadata") or {}, live.get("metadata") or {}
    if not sub(d_meta.get("labels"), l_meta.get("labels")) or not sub(d_meta.get("annotations"), l_meta.get("annotations")):
        return True
    d_spec, l_spec = desired.get("spec") or {}, live.get("spec") or {}
    if "replicas" in d_spec and d_spec["replicas"] != l_spec.get("replicas"):
        return True
    if "selector" in d_spec and desired.get("kind") == "Service" and d_spec["selector"] != l_spec.get("selector"):
        return True
    d_tpl, l_tpl = d_spec.get("template") or {}, l_spec.get("template") or {}
    if not sub((d_tpl.get("metadata") or {}).get("labels"), (l_tpl.get("metadata") or {}).get("labels")):
        return True
    d_containers = (d_tpl.get("spec") or {}).get("containers")
    if d_containers is not None:
        l_containers = (l_tpl.get("spec") or {}).get("containers") or []
        if len(l_containers) != len(d_containers):
            return True
        fields = ("name", "image", "command", "args")
        # An empty list is not stored (omitempty): absent and empty are the same.
        return any((d.get(f) or None) != (l_c.get(f) or None)
                   for d, l_c in zip(d_containers, l_containers, strict=True) for f in fields)
    return False


def sooner(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)
