"""The leader-election Lease (`coordination.k8s.io/v1`): read, create, and update it with optimistic
concurrency. An update carries the resourceVersion that was read, so the API server refuses it
(409 Conflict) when anyone wrote the Lease in between: of two replicas that both decided to take
it, exactly one wins. A create of a Lease someone else just created is a 409 too.

The calls go through KubeClient's threads and deadlines (client.py), but not through its write
fence: the Lease is how the fence is earned (controller/leader.py).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from slmfleet.k8s.client import ApiError, KubeClient


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease says, and the resourceVersion it was read at ("" when there is no Lease)."""

    holder: str = ""
    lease_duration_seconds: int = 0
    acquire_time: str = ""  # RFC 3339 MicroTime, as the API server stores it
    renew_time: str = ""
    transitions: int = 0
    resource_version: str = ""


class LeaseConflict(Exception):
    """Someone else wrote (or created) the Lease since we read it."""


def micro_time(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return f"{path}/{name}" if name else path


def _record(obj: dict[str, Any]) -> LeaseRecord:
    spec = obj.get("spec") or {}
    return LeaseRecord(
        holder=spec.get("holderIdentity") or "",
        lease_duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=spec.get("acquireTime") or "",
        renew_time=spec.get("renewTime") or "",
        transitions=int(spec.get("leaseTransitions") or 0),
        resource_version=(obj.get("metadata") or {}).get("resourceVersion", ""),
    )


def _body(namespace: str, name: str, record: LeaseRecord) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": {"app.kubernetes.io/managed-by": "slmfleet"}}
    if record.resource_version:
        metadata["resourceVersion"] = record.resource_version
    spec: dict[str, Any] = {"holderIdentity": record.holder, "leaseDurationSeconds": record.lease_duration_seconds,
                            "leaseTransitions": record.transitions}
    if record.acquire_time:
        spec["acquireTime"] = record.acquire_time
    if record.renew_time:
        spec["renewTime"] = record.renew_time
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}


class LeaseClient:
    def __init__(self, client: KubeClient, namespace: str, name: str) -> None:
        self._client = client
        self.namespace = namespace
        self.name = name

    async def read(self) -> LeaseRecord | None:
        """The Lease, or None when there is none."""
        try:
            obj = await self._client._call("GET", _path(self.namespace, self.name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return _record(obj)

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        """Creates the Lease as `record` says; LeaseConflict when it exists already."""
        return await self._write("POST", _path(self.namespace), record, "created by someone else")

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        """Replaces the Lease with `record`, if it is still at `record.resource_version`;
        LeaseConflict otherwise."""
        return await self._write("PUT", _path(self.namespace, self.name), record, "changed since it was read")

    async def _write(self, method: str, path: str, record: LeaseRecord, conflict: str) -> LeaseRecord:
        try:
            obj = await self._client._call(method, path, _body(self.namespace, self.name, record))
        except ApiError as exc:
            if exc.status == 409:
                raise LeaseConflict(f"lease {self.namespace}/{self.name} {conflict}") from exc
            raise
        return _record(obj)
