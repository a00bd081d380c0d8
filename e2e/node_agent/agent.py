"""The node agent: a small kubelet for `slmfleet.io/node-agent: process` nodes.

It keeps its Node Ready (status plus a Lease in kube-node-lease, as a kubelet does), watches the
pods bound to its node, runs each with a PodRunner, and on deletion stops the processes within the
grace period and then deletes the pod for good. It authenticates as system:node:<name>, so the
Node authorizer and NodeRestriction hold it to its own node and pods.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from e2e.node_agent import images, spec
from e2e.node_agent.kube import ApiError, Kube
from e2e.node_agent.pod import PodRunner
from e2e.node_agent.registry import Registry

log = logging.getLogger("node-agent")

LEASE_DURATION_S = 40
LEASE_RENEW_S = 10
STATUS_EVERY_S = 60
KUBELET_VERSION = "v1.34.4-slmfleet-process"


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodIPs:
    """Pod IPs from the node's 127.x pod CIDR; .0 and .1 are skipped."""

    def __init__(self, cidr: str):
        self.hosts = [str(ip) for ip in ipaddress.IPv4Network(cidr).hosts()][1:]
        self.by_uid: dict[str, str] = {}

    def allocate(self, uid: str, previous: str | None = None) -> str:
        if uid in self.by_uid:
            return self.by_uid[uid]
        used = set(self.by_uid.values())
        ip = previous if previous in self.hosts and previous not in used else next(
            (h for h in self.hosts if h not in used), None)
        if ip is None:
            raise RuntimeError("pod CIDR exhausted")
        self.by_uid[uid] = ip
        return ip

    def release(self, uid: str) -> None:
        self.by_uid.pop(uid, None)


class NodeAgent:
    def __init__(self, node: str, kubeconfig: Path, state_dir: Path, pod_cidr: str, registry: str | None = None):
        self.node = node
        self.kube = Kube(kubeconfig)
        endpoint = URL(self.kube.server)
        self.api_host, self.api_port = endpoint.host or "127.0.0.1", endpoint.port or 443
        self.registry = Registry(registry)
        self.pulled: dict[str, images.ImageSpec] = {}  # the node's image store: reference -> pulled image
        self.http: aiohttp.ClientSession | None = None  # registry pulls
        self.state_dir = state_dir
        self.ips = PodIPs(pod_cidr)
        self.pods: dict[str, PodRunner] = {}
        self._stop = asyncio.Event()
        self.probes: aiohttp.ClientSession | None = None  # one session for every pod's HTTP probes

    # ------------------------------------------------------------------ node

    async def update_node_status(self) -> None:
        node = await self.kube.get(f"/api/v1/nodes/{self.node}")
        now = _now()
        conditions = [
            {"type": kind, "status": "False", "reason": f"KubeletHas{reason}", "message": message,
             "lastHeartbeatTime": now, "lastTransitionTime": now}
            for kind, reason, message in (
                ("MemoryPressure", "SufficientMemory", "kubelet has sufficient memory available"),
                ("DiskPressure", "NoDiskPressure", "kubelet has no disk pressure"),
                ("PIDPressure", "SufficientPID", "kubelet has sufficient PID available"),
            )
        ]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                           "message": "slmfleet node agent is posting ready status",
                           "lastHeartbeatTime": now, "lastTransitionTime": now})
        previous = {c["type"]: c for c in (node.get("status") or {}).get("conditions") or []}
        for c in conditions:
            old = previous.get(c["type"])
            if old and old.get("status") == c["status"]:
                c["lastTransitionTime"] = old.get("lastTransitionTime", now)
        status = {
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {"machineID": self.node, "systemUUID": self.node, "bootID": self.boot_id,
                         "kernelVersion": "", "osImage": "slmfleet process node", "containerRuntimeVersion":
                         "process://slmfleet-node-agent", "kubeletVersion": KUBELET_VERSION,
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        }
        await self.kube.request("PATCH", f"/api/v1/nodes/{self.node}/status", {"status": status},
                                content_type="application/strategic-merge-patch+json")

    async def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        lease = await self.kube.get(path, ok_missing=True)
        if lease is None:
            await self.kube.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_DURATION_S,
                         "renewTime": _micro_now()},
            })
            return
        lease["spec"]["renewTime"] = _micro_now()
        lease["spec"]["holderIdentity"] = self.node
        lease["spec"]["leaseDurationSeconds"] = LEASE_DURATION_S
        await self.kube.request("PUT", path, lease)

    async def heartbeat(self) -> None:
        since_status = STATUS_EVERY_S
        while not self._stop.is_set():
            try:
                if since_status >= STATUS_EVERY_S:
                    await self.update_node_status()
                    since_status = 0
                await self.renew_lease()
            except (TimeoutError, ApiError, aiohttp.ClientError) as exc:
                log.warning("heartbeat failed: %s", exc)
            since_status += LEASE_RENEW_S
            try:
                await asyncio.wait_for(self._stop.wait(), LEASE_RENEW_S)
            except TimeoutError:
                pass

    # ------------------------------------------------------------------ events

    async def event(self, pod: dict[str, Any], reason: str, message: str, kind: str = "Normal") -> None:
        meta = pod["metadata"]
        # Core v1 Events, as the kubelet writes them (the Node authorizer allows exactly these).
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "reason": reason, "message": message[:1024], "type": kind, "count": 1,
            "firstTimestamp": _now(), "lastTimestamp": _now(),
            "source": {"component": "kubelet", "host": self.node},
            "reportingComponent": "kubelet", "reportingInstance": self.node,
        }
        try:
            await self.kube.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", body)
        except (TimeoutError, ApiError, aiohttp.ClientError) as exc:
            log.warning("event not recorded: %s", exc)

    # ------------------------------------------------------------------ pods

    async def on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        runner = self.pods.get(uid)
        if kind == "DELETED":
            if runner:
                runner.kill_now()
                self._forget(uid)
            return
        if runner is None:
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp"):
                return
            ip = self.ips.allocate(uid, pod.get("status", {}).get("podIP"))
            runner = PodRunner(self, pod, ip)
            self.pods[uid] = runner
            log.info("pod %s/%s: starting on %s", runner.namespace, runner.name, ip)
            runner.start()
        if pod["metadata"].get("deletionTimestamp") and not runner.terminating:
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            if grace is None:
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            asyncio.create_task(self._delete(runner, float(grace)))

    async def _delete(self, runner: PodRunner, grace: float) -> None:
        log.info("pod %s/%s: stopping (grace %.0fs)", runner.namespace, runner.name, grace)
        await runner.terminate(grace)
        await runner.push_status()
        try:
            await self.kube.request(
                "DELETE", f"/api/v1/namespaces/{runner.namespace}/pods/{runner.name}",
                {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                 "preconditions": {"uid": runner.uid}})
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s/%s: final delete failed: %s", runner.namespace, runner.name, exc)
        self._forget(runner.uid)

    def _forget(self, uid: str) -> None:
        self.pods.pop(uid, None)
        self.ips.release(uid)

    async def watch_pods(self) -> None:
        path = "/api/v1/pods"
        selector = {"fieldSelector": f"spec.nodeName={self.node}"}
        while not self._stop.is_set():
            try:
                listing = await self.kube.get(path, params=selector)
                seen = set()
                for pod in listing["items"]:
                    seen.add(pod["metadata"]["uid"])
                    await self.on_pod("MODIFIED", pod)
                for uid in list(self.pods):
                    if uid not in seen:
                        self.pods[uid].kill_now()
                        self._forget(uid)
                rv = listing["metadata"]["resourceVersion"]
                # Short watches, then a full relist: like the kubelet's periodic pod sync, this bounds
                # how long a missed watch event can go unnoticed.
                async for event in self.kube.watch(path, dict(selector, resourceVersion=rv, timeoutSeconds="30")):
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: relist
                    if event["type"] == "BOOKMARK":
                        continue
                    await self.on_pod(event["type"], event["object"])
            except (TimeoutError, ApiError, aiohttp.ClientError, ValueError) as exc:
                log.warning("pod watch interrupted: %r; relisting", exc)
                await asyncio.sleep(1)

    # ------------------------------------------------------------------ main

    async def run(self) -> None:
        self.boot_id = uuid.uuid4().hex
        # Probes go to pod IPs without client certificates and must not reuse pooled connections
        # across container restarts, so: no keep-alive.
        self.probes = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        self.http = aiohttp.ClientSession()
        if os.geteuid() == 0:
            # The mount point of each container's private /run/secrets (spec.mount_namespace_argv).
            os.makedirs(spec.SECRETS_DIR, exist_ok=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        (self.state_dir / "pods").mkdir(parents=True, exist_ok=True)
        tasks = [asyncio.create_task(self.heartbeat()), asyncio.create_task(self.watch_pods())]
        log.info("node agent for %s running", self.node)
        await self._stop.wait()
        log.info("node agent for %s stopping: stopping %d pods' processes", self.node, len(self.pods))
        await asyncio.gather(*(r.terminate(5) for r in list(self.pods.values())), return_exceptions=True)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.kube.close()
        await self.probes.close()
        await self.http.close()
