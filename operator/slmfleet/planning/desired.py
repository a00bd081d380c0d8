"""The objects a model's plan applies: the revision's Deployment and Service, the model Service
with the canary weight, and the HTTPRoute when a rollout routes by it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slmfleet.api.config import OperatorConfig
from slmfleet.api.modelrollout import HttpRouteTraffic
from slmfleet.api.smallmodel import Placement, SmallModelSpec
from slmfleet.builders import ModelOwner, build_deployment, build_model_service, build_revision_service
from slmfleet.builders.applied_hash import with_applied_hash
from slmfleet.builders.traffic import build_http_route
from slmfleet.builders.weights import LOADER_CONTAINER


def keep_loader_image(desired: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any]:
    """The revision's Deployment with the loader image its live version already has. The loader
    runs once, when a pod starts, and its image is the operator's own: upgrading the operator must
    not restart every serving model to swap a loader that has finished. New revisions (and a
    revision's first Deployment) get the configured loader."""
    if live is None:
        return desired
    running = {c.get("name"): c.get("image")
               for c in (((live.get("spec") or {}).get("template") or {}).get("spec") or {}).get("initContainers") or []}
    for c in desired["spec"]["template"]["spec"].get("initContainers") or []:
        if c["name"] == LOADER_CONTAINER and running.get(LOADER_CONTAINER):
            c["image"] = running[LOADER_CONTAINER]
    return desired


@dataclass(frozen=True)
class Target:
    """The model's revision being built, and what builds it."""

    owner: ModelOwner
    spec: SmallModelSpec  # as served (a deprecated base: the fallback's source)
    revision: str
    config: OperatorConfig
    disk_bytes: int | None  # the weights' size on disk, when read from the source
    live: dict[str, Any] | None  # the revision's Deployment

    def deployment(self, placement: Placement, replicas: int | None = None) -> dict[str, Any]:
        """The revision's Deployment (at `replicas` when a rollout sets them). Raises
        builders.UnsupportedSource for a source the operator cannot load."""
        spec = self.spec
        if replicas is not None:
            spec = spec.model_copy(update={"serving": spec.serving.model_copy(update={"replicas": replicas})})
        built = build_deployment(self.owner, spec, placement, self.revision, self.config, self.disk_bytes)
        return with_applied_hash(keep_loader_image(built, self.live))

    def revision_service(self) -> dict[str, Any]:
        return with_applied_hash(build_revision_service(self.owner, self.revision, self.config))


def traffic_objects(target: Target, serving: str, canary: str | None, weight: int,
                    route: HttpRouteTraffic | None) -> list[dict[str, Any]]:
    """The model Service (it selects `serving`, and `canary` at `weight` by the replica ratio when
    no route carries the weight) and the HTTPRoute that splits `weight` to `canary`, if one does."""
    by_ratio = canary if route is None else None
    desired = [with_applied_hash(build_model_service(target.owner, serving, target.config, canary_revision=by_ratio,
                                                     canary_weight=weight if by_ratio else 0))]
    if route is not None:
        desired.append(with_applied_hash(build_http_route(target.owner, route, serving, canary,
                                                          weight if canary else 0, target.config)))
    return desired
