"""The one door to the API server for writes: server-side apply, deletes, status and Events.

Reads come from the operator's watch-fed stores (controller/stores.py), so a reconcile that finds nothing to change
makes no request at all. To keep that promise for server-side apply, which is always a request
even when it changes nothing, every applied object carries the hash of what was applied
(builders/applied_hash.py); an object whose live hash equals the desired one is not sent again.

Requests go out on aiohttp, on the operator's event loop, as kopf's watches do: no thread per
call, and no kubernetes package (its import alone is about 50 MiB of generated classes). Every
call has a client-side deadline, so a server that stopped answering fails the call instead of
hanging a worker for good.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

import slmfleet
from slmfleet.k8s import connection
from slmfleet.k8s.connection import ApiConnection, ConfigError

__all__ = ["ApiError", "ConfigError", "KubeClient", "NotLeading", "ObjectRef", "SecretObject"]

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
MAX_CONNECTIONS = 16  # above the workers' default of 4, each with one call at a time, and the background readers'
# Probe an idle connection after 30 s, every 10 s, and give it up after 3 unanswered probes.
KEEPALIVE_OPTIONS = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
]


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"({status}) {reason}" + (f": {message[:300]}" if message else ""))
        self.status, self.reason, self.message = status, reason, message


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
        self.connection: ApiConnection = connection.load(kubeconfig)
        self._timeout = aiohttp.ClientTimeout(sock_connect=request_timeout[0], sock_read=request_timeout[1])
        # Which process wrote what, in the API server's audit log (replicas share one identity).
        self._user_agent = f"slmfleet-operator/{slmfleet.__version__} (pid {os.getpid()})"
        self._read_timeout = request_timeout[1]
        self._session: aiohttp.ClientSession | None = None
        self._session_key: tuple[Any, bytes | None, bytes | None] | None = None  # its loop and client certificate
        self._closing: asyncio.Task[None] | None = None

    def _fence(self, what: str) -> None:
        if self.may_write is not None and not self.may_write():
            raise NotLeading(f"not the leader: {what} refused")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self, creds: connection.Credentials) -> aiohttp.ClientSession:
        """One session (one connection pool) per event loop and client certificate: a rotated
        certificate (an exec plugin's) gets a new pool; the old one closes."""
        loop = asyncio.get_running_loop()
        key = (loop, creds.cert_pem, creds.key_pem)
        session = self._session
        if session is not None and not session.closed and self._session_key == key:
            return session
        if session is not None and not session.closed and self._session_key and self._session_key[0] is loop:
            self._closing = loop.create_task(session.close())  # kept referenced until it ran
        tls: ssl.SSLContext | bool = self.connection.ssl_context(creds) or True
        connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ssl=tls, socket_factory=_keepalive_socket)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                              headers={"User-Agent": self._user_agent}, trust_env=False)
        self._session_key = key
        return self._session

    async def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                    query: list[tuple[str, str]] | None = None, *, write: str | None = None) -> Any:
        """One request; its JSON answer (None when empty). A `write` (what it is, for the error)
        passes the fence just before the request is sent. A 401 reads the credentials afresh
        (a rotated service-account token) and tries once more; a pooled connection the server had
        closed is reconnected once; nothing else is retried here: the work queue retries
        reconciles with back-off."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {"Accept": "application/json", "Content-Type": content_type}
        fresh = False
        for attempt in range(2):
            if self.connection.exec_plugin is not None:  # may run the plugin: not on the event loop
                creds = await asyncio.to_thread(self.connection.credentials, fresh=fresh)
            else:
                creds = self.connection.credentials(fresh=fresh)
            if creds.token:
                headers["Authorization"] = f"Bearer {creds.token}"
            if write is not None:  # no await from here to the request's first byte
                self._fence(write)
            session = self._open(creds)
            try:
                async with session.request(method, self.connection.server + path, params=query or None,
                                           data=data, headers=headers, proxy=self.connection.proxy) as response:
                    text = await response.read()
                    if response.status == 401 and attempt == 0 and (self.connection.token_file
                                                                     or self.connection.exec_plugin):
                        fresh = True
                        continue
                    if response.status >= 400:
                        raise _error(response.status, response.reason or "", text)
                    return json.loads(text) if text else None
            except aiohttp.ServerDisconnectedError:
                if attempt:
                    raise
            except aiohttp.ConnectionTimeoutError as exc:
                raise TimeoutError("the API server did not accept a connection in time") from exc
            except TimeoutError as exc:  # aiohttp's SocketTimeoutError too
                raise TimeoutError(f"the API server did not answer: read timed out "
                                   f"(deadline {self._read_timeout:g}s)") from exc
        raise AssertionError("unreachable")

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of `obj` (which should carry its applied hash)."""
        meta = obj["metadata"]
        path = _path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return await self._call("PATCH", path, obj, "application/apply-patch+yaml", query,
                                write=f"apply {obj['kind']} {meta['namespace']}/{meta['name']}")

    async def delete(self, ref: ObjectRef) -> None:
        path = _path(ref.api_version, ref.kind, ref.namespace, ref.name)
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if ref.uid:
            body["preconditions"] = {"uid": ref.uid}
        try:
            await self._call("DELETE", path, body, write=f"delete {ref.kind} {ref.namespace}/{ref.name}")
        except ApiError as exc:
            if exc.status not in (404, 409):  # already gone, or replaced by a new object of that name
                raise

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> dict[str, Any]:
        """Replace the status wholesale (a JSON merge patch would leave removed keys behind)."""
        path = _path(ref.api_version, ref.kind, ref.namespace, ref.name, "status")
        # "add" replaces an existing member (RFC 6902), and also works when there is no status yet.
        patch = [{"op": "add", "path": "/status", "value": status}]
        return await self._call("PATCH", path, patch, "application/json-patch+json",
                                write=f"status of {ref.kind} {ref.namespace}/{ref.name}")

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self._call("GET", _path(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list_pages(self, api_version: str, plural: str, namespace: str | None = None,
                         label_selector: str | None = None, field_selector: str | None = None,
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
            if field_selector:
                query.append(("fieldSelector", field_selector))
            if token:
                query.append(("continue", token))
            page = await self._call("GET", path, None, "application/json", query)
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
            found = await self._call("GET", f"/apis/{api_version}")
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in (found or {}).get("resources") or [])

    async def read_secret_object(self, namespace: str, name: str) -> SecretObject:
        """The Secret's data (decoded), labels and annotations. Callers must keep the values out of
        logs, status and Events."""
        obj = await self._call("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        meta = obj.get("metadata") or {}
        return SecretObject(data={k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()},
                            labels=dict(meta.get("labels") or {}), annotations=dict(meta.get("annotations") or {}))

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str]:
        obj = await self._call("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
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
            await self._call("POST", path, event, write=f"event {reason} on {ref.kind} {ref.namespace}/{ref.name}")
        except ApiError as exc:  # an Event is best effort; the status already says it all
            log.warning("could not post event %s for %s/%s: %s", reason, ref.namespace, ref.name, exc.reason)


def _keepalive_socket(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    for option in KEEPALIVE_OPTIONS:
        sock.setsockopt(*option)
    return sock


def _error(status: int, reason: str, text: bytes) -> ApiError:
    """The API server's Status (its reason and message), or the HTTP reason."""
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("kind") == "Status":
        return ApiError(status, str(doc.get("reason") or reason), str(doc.get("message") or ""))
    return ApiError(status, reason)
