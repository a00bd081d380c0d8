"""The SmallModel that owns the objects built for it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slmfleet.api.smallmodel import GROUP, KIND, VERSION


@dataclass(frozen=True)
class ModelOwner:
    """Identity of a SmallModel object: enough to name, place and own its children."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ModelOwner:
        """From a SmallModel's `metadata` as the API server returns it."""
        return cls(name=metadata["name"], namespace=metadata["namespace"], uid=metadata["uid"])

    def owner_reference(self) -> dict[str, Any]:
        # controller: true makes the SmallModel the one controller of the object (another
        # controller cannot adopt it); blockOwnerDeletion makes foreground deletion of the
        # SmallModel wait for its Deployments and Services.
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
