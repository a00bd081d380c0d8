"""The objects a model's plan applies: the revision's Deployment, the model Service with the
canary weight, and the HTTPRoute when a rollout routes by it, with the revision Services it names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slmfleet.api.config import OperatorConfig
from slmfleet.api.modelrollout import HttpRouteTraffic
from slmfleet.api.smallmodel import Placement, SmallModelSpec
from slmfleet.builders import ModelOwner, build_deployment, build_model_service, build_revision_service
from slmfleet.builders.applied_hash import with_applied_hash
from slmfleet.builders.pod import CONTAINER_NAME
from slmfleet.builders.traffic import build_http_route
from slmfleet.builders.weights import LOADER_CONTAINER


@dataclass(frozen=True)
class LivePodShape:
    """What a revision's live Deployment fixes about its pods across operator upgrades.

    The operator's release shapes every pod template: its loader image (the operator's own image)
    and the pod hardening (builders/pod.py). Applying a new release's shape to a running revision
    would change its template and roll every serving model, for nothing the model asked for: the
    loader has long finished, and the hardening can wait for the model's next revision. So a
    revision with a live Deployment keeps the loader image and the hardening it was built with,
    the applied template equals the live one and no rollout happens. New revisions (and a
    revision's first Deployment) get the release's shape."""

    loader_image: str | None  # the live loader's image; None: the configured one
    hardened: bool

    @classmethod
    def of(cls, live: dict[str, Any] | None) -> LivePodShape:
        if live is None:
            return cls(loader_image=None, hardened=True)
        pod = ((live.get("spec") or {}).get("template") or {}).get("spec") or {}
        loaders = [c for c in pod.get("initContainers") or [] if c.get("name") == LOADER_CONTAINER]
        servers = [c for c in pod.get("containers") or [] if c.get("name") == CONTAINER_NAME]
        # Hardened pods are recognised by vLLM's read-only root file system, which only they have.
        hardened = any((c.get("securityContext") or {}).get("readOnlyRootFilesystem") is True for c in servers)
        return cls(loader_image=next((c["image"] for c in loaders if c.get("image")), None), hardened=hardened)

    def config_for(self, config: OperatorConfig) -> OperatorConfig:
        """The operator's config, with the live loader image when there is one."""
        if self.loader_image is None or self.loader_image == config.loader_image:
            return config
        return config.model_copy(update={"loader_image": self.loader_image})


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
        shape = LivePodShape.of(self.live)
        return with_applied_hash(build_deployment(self.owner, spec, placement, self.revision,
                                                  shape.config_for(self.config), self.disk_bytes,
                                                  hardened=shape.hardened))


def traffic_objects(target: Target, serving: str, canary: str | None, weight: int,
                    route: HttpRouteTraffic | None) -> list[dict[str, Any]]:
    """The model Service (it selects `serving`, and `canary` at `weight` by the replica ratio when
    no route carries the weight) and the HTTPRoute that splits `weight` to `canary`, if one does.

    A revision gets a Service of its own only as an HTTPRoute's backend: clients use the model
    Service, and evaluations address the pods. One Service per model, not two, for a model no
    route splits: a write and an ownership read fewer for each new model."""
    by_ratio = canary if route is None else None
    desired = [with_applied_hash(build_model_service(target.owner, serving, target.config, canary_revision=by_ratio,
                                                     canary_weight=weight if by_ratio else 0))]
    if route is not None:
        desired.extend(with_applied_hash(build_revision_service(target.owner, revision, target.config))
                       for revision in dict.fromkeys((serving, canary)) if revision is not None)
        desired.append(with_applied_hash(build_http_route(target.owner, route, serving, canary,
                                                          weight if canary else 0, target.config)))
    return desired
