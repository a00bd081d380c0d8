"""The one door to the API server for writes: server-side apply, deletes, status and Events.

Reads come from the operator's watch-fed stores (controller/stores.py), so a reconcile that finds nothing to change
makes no request at all. To keep that promise for server-side apply, which is always a request
even when it changes nothing, every applied object carries the hash of what was applied
(builders/applied_hash.py); an object whose live hash equals the desired one is not sent again.

The kubernetes client is synchronous, so calls run in a worker thread. Every call has a
client-side deadline and its connections TCP keepalive: a half-open connection (an API server that
stopped answering, a dropped route) fails the call instead of hanging a worker for good.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from urllib3.connection import HTTPConnection
from urllib3.util.retry import Retry

import slmfleet

FIELD_MANAGER = "slmfleet"
LIST_PAGE_SIZE = 100
"""Objects per page of a full listing (the operator's and kopf's): the decoded page is what a
listing holds in memory at once, and a hundred whole objects is about 2 MiB of them."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str = ""


_PLURALS = {"Deployment": "deployments", "Service": "services", "SmallModel": "smallmodels",
            "ModelRollout": "modelrollouts", "HTTPRoute": "httproutes"}


def _path(api_version: str, kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{_PLURALS[kind]}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


# (connect, read) seconds for every call; a read is one response, which the API server gives in
# well under a second when it is healthy.
REQUEST_TIMEOUT = (5.0, 30.0)
# Probe an idle connection after 30 s, every 10 s, and give it up after 3 unanswered probes.
API_THREADS = 16  # above the workers' default of 4, each with one call at a time, and the background readers'

KEEPALIVE_OPTIONS = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
]


@dataclass(frozen=True)
class SecretObject:
    data: dict[str, str]  # decoded values: never into logs, status or Events
    labels: dict[str, str]
    annotations: dict[str, str]


class NotLeading(Exception):
    """A write refused by the client's fence: this replica may not write now (controller/leader.py)."""


class KubeClient:
    """Writes as field manager `slmfleet`. Every write (apply, delete, patch_status, post_event)
    first asks `may_write` (when given), and is refused with NotLeading, before any byte is sent,
    unless it says yes: the leader-election fence (controller/leader.py)."""

    def __init__(self, kubeconfig: str | None = None,
                 request_timeout: tuple[float, float] = REQUEST_TIMEOUT,
                 may_write: Callable[[], bool] | None = None) -> None:
        self.may_write = may_write
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        # No retries inside a call: urllib3's default (3) multiplies every timeout by four for a GET;
        # the work queue retries the reconcile with back-off instead. One reconnect is kept for a
        # pooled connection the server closed.
        configuration.retries = Retry(total=1, connect=1, read=0, status=0, redirect=0, other=0)
        self._api = kubernetes.client.ApiClient(configuration)
        # Which process wrote what, in the API server's audit log (replicas share one identity).
        self._api.user_agent = f"slmfleet-operator/{slmfleet.__version__} (pid {os.getpid()})"
        self._timeout = request_timeout
        # The generated client has no setting for socket options: give them to the pool manager,
        # which passes them to every connection it opens.
        pool_kw = self._api.rest_client.pool_manager.connection_pool_kw
        pool_kw["socket_options"] = [*HTTPConnection.default_socket_options, *KEEPALIVE_OPTIONS]
        self._threads = ThreadPoolExecutor(API_THREADS, thread_name_prefix="slmfleet-api")

    def _fence(self, what: str) -> None:
        if self.may_write is not None and not self.may_write():
            raise NotLeading(f"not the leader: {what} refused")

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._api.close()

    async def _in_thread(self, *call: Any, write: str | None = None) -> Any:
        """The blocking client on threads of its own: nothing else the operator runs on threads
        (storage reads, evaluation datasets) can keep an API call waiting for one. A `write` (what
        it is, for the error) passes the fence on its thread, just before the request is sent, not
        when it was queued."""

        def call_now() -> Any:
            if write is not None:
                self._fence(write)
            return self._call(*call)

        return await asyncio.get_running_loop().run_in_executor(self._threads, call_now)

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
              query: list[tuple[str, str]] | None = None) -> Any:
        response = self._api.call_api(
            path,
            method,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
            _request_timeout=self._timeout,
        )
        data = response.data
        return json.loads(data) if data else None

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of `obj` (which should carry its applied hash)."""
        meta = obj["metadata"]
        path = _path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return await self._in_thread("PATCH", path, obj, "application/apply-patch+yaml", query,
                                     write=f"apply {obj['kind']} {meta['namespace']}/{meta['name']}")

    async def delete(self, ref: ObjectRef) -> None:
        path = _path(ref.api_version, ref.kind, ref.namespace, ref.name)
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if ref.uid:
            body["preconditions"] = {"uid": ref.uid}
        try:
            await self._in_thread("DELETE", path, body, write=f"delete {ref.kind} {ref.namespace}/{ref.name}")
        except ApiException as exc:
            if exc.status not in (404, 409):  # already gone, or replaced by a new object of that name
                raise

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> dict[str, Any]:
        """Replace the status wholesale (a JSON merge patch would leave removed keys behind)."""
        path = _path(ref.api_version, ref.kind, ref.namespace, ref.name, "status")
        # "add" replaces an existing member (RFC 6902), and also works when there is no status yet.
        patch = [{"op": "add", "path": "/status", "value": status}]
        return await self._in_thread("PATCH", path, patch, "application/json-patch+json",
                                     write=f"status of {ref.kind} {ref.namespace}/{ref.name}")

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self._in_thread("GET", _path(api_version, kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def list_pages(self, api_version: str, plural: str, namespace: str | None = None,
                         label_selector: str | None = None,
                         page_size: int = LIST_PAGE_SIZE) -> AsyncIterator[list[dict[str, Any]]]:
        """Every object of `plural` (in `namespace`, or cluster-wide), a page at a time (only one page
        of whole objects is in memory at once), each with its apiVersion and kind filled in as a
        watch event has them. A continue token that expired (410) ends the listing with an error."""
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
        token = ""
        while True:
            query = [("limit", str(page_size))]
            if label_selector:
                query.append(("labelSelector", label_selector))
            if token:
                query.append(("continue", token))
            page = await self._in_thread("GET", path, None, "application/json", query)
            kind = str(page.get("kind") or "").removesuffix("List")
            items = page.get("items") or []
            for item in items:
                item.setdefault("apiVersion", api_version)
                item.setdefault("kind", kind)
            yield items
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                return

    async def serves(self, api_version: str, plural: str) -> bool:
        """Whether the API server serves `plural` in `api_version` (e.g. whether a CRD is installed)."""
        try:
            found = await self._in_thread("GET", f"/apis/{api_version}")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in (found or {}).get("resources") or [])

    async def read_secret_object(self, namespace: str, name: str) -> SecretObject:
        """The Secret's data (decoded), labels and annotations. Callers must keep the values out of
        logs, status and Events."""
        obj = await self._in_thread("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        meta = obj.get("metadata") or {}
        return SecretObject(data={k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()},
                            labels=dict(meta.get("labels") or {}), annotations=dict(meta.get("annotations") or {}))

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str]:
        obj = await self._in_thread("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        return dict(obj.get("data") or {})

    async def post_event(self, ref: ObjectRef, type_: str, reason: str, message: str) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}-", "namespace": ref.namespace},
            "eventTime": now,
            "reportingController": "slmfleet.io/operator",
            "reportingInstance": "slmfleet-operator",
            "action": reason,
            "reason": reason,
            "type": type_,
            "note": message[:1024],
            "regarding": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "namespace": ref.namespace,
                "name": ref.name,
                "uid": ref.uid,
            },
        }
        path = f"/apis/events.k8s.io/v1/namespaces/{ref.namespace}/events"
        try:
            await self._in_thread("POST", path, event, write=f"event {reason} on {ref.kind} {ref.namespace}/{ref.name}")
        except ApiException as exc:  # an Event is best effort; the status already says it all
            log.warning("could not post event %s for %s/%s: %s", reason, ref.namespace, ref.name, exc.reason)
