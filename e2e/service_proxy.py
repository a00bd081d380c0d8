"""The local cluster's kube-proxy: Service ClusterIPs answer, as on a real node.

The service CIDR is in loopback (127.x.0.0/16), so a ClusterIP is an address this machine owns.
For every TCP port of every Service with a ClusterIP, this proxy listens on clusterIP:port and
splices each connection to a ready endpoint, chosen round-robin. It runs once for the whole
cluster (every process node shares the host's network).

The endpoints are worked out from Pods, as the endpoint-slice controller would (the selector's
Ready pods, the target port resolved by name): the API server refuses loopback addresses in
EndpointSlices, so the controller cannot record pod IPs of 127.x. That is why this proxy reads
Pods, which kube-proxy never does, and runs with the cluster's admin rights as kwok does.

    python -m e2e.service_proxy --kubeconfig FILE --service-cidr 127.62.0.0/16
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import logging
import signal
from pathlib import Path
from typing import Any

import aiohttp

from e2e.node_agent.kube import ApiError, Kube

log = logging.getLogger("service-proxy")

Key = tuple[str, int]  # (clusterIP, port)


def desired_listeners(services: list[dict[str, Any]], cidr: ipaddress.IPv4Network) -> dict[Key, tuple[str, str, str]]:
    """(clusterIP, port) -> (namespace, service name, port name) for every TCP Service port whose
    ClusterIP is in the (loopback) service CIDR."""
    out: dict[Key, tuple[str, str, str]] = {}
    for svc in services:
        spec = svc.get("spec") or {}
        ip = spec.get("clusterIP")
        if not ip or ip == "None" or ipaddress.ip_address(ip) not in cidr:
            continue
        for port in spec.get("ports") or []:
            if port.get("protocol", "TCP") == "TCP":
                out[(ip, int(port["port"]))] = (svc["metadata"]["namespace"], svc["metadata"]["name"],
                                                port.get("name", ""))
    return out


def ready_endpoints(service: dict[str, Any], port_name: str, pods: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """The ready (pod IP, port) pairs behind a Service port: pods of its namespace that match its
    selector, are Ready and not terminating; a named targetPort is looked up in each pod."""
    spec = service.get("spec") or {}
    selector = spec.get("selector") or {}
    port = next((p for p in spec.get("ports") or [] if (p.get("name") or "") == port_name), None)
    if not selector or port is None:
        return []  # no selector: endpoints are the user's to manage (and here, none)
    target = port.get("targetPort", port["port"])
    out = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("namespace") != service["metadata"]["namespace"] or meta.get("deletionTimestamp"):
            continue
        labels = meta.get("labels") or {}
        if any(labels.get(k) != v for k, v in selector.items()) or not status.get("podIP"):
            continue
        if not ipaddress.ip_address(status["podIP"]).is_loopback:
            continue  # the local cluster's pods are on loopback; never dial anything else
        if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []):
            continue
        if isinstance(target, int) or str(target).isdigit():
            out.append((status["podIP"], int(target)))
            continue
        named = [cp["containerPort"] for c in (pod.get("spec") or {}).get("containers") or []
                 for cp in c.get("ports") or [] if cp.get("name") == target]
        if named:
            out.append((status["podIP"], int(named[0])))
    return sorted(out)


class ServiceProxy:
    def __init__(self, kubeconfig: Path, cidr: str):
        self.cidr = ipaddress.IPv4Network(cidr)
        if not self.cidr.is_loopback:
            raise ValueError(f"the service CIDR must be in loopback, not {cidr}")
        self.kube = Kube(kubeconfig)
        self.servers: dict[Key, asyncio.base_events.Server] = {}
        self.routes: dict[Key, tuple[str, str, str]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self._turn = itertools.count()

    async def sync(self) -> None:
        services = (await self.kube.get("/api/v1/services"))["items"]
        self.pods = (await self.kube.get("/api/v1/pods", params={"fieldSelector": "status.phase=Running"}))["items"]
        self.services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services}
        wanted = desired_listeners(services, self.cidr)
        for key in set(self.servers) - set(wanted):
            self.servers.pop(key).close()
            log.info("stopped %s:%d", *key)
        self.routes = wanted
        for key in set(wanted) - set(self.servers):
            try:
                self.servers[key] = await asyncio.start_server(
                    lambda r, w, key=key: self._forward(key, r, w), host=key[0], port=key[1])
                log.info("listening on %s:%d for %s/%s", *key, *wanted[key][:2])
            except OSError as exc:
                log.warning("cannot listen on %s:%d: %s", *key, exc)

    async def _forward(self, key: Key, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        route = self.routes.get(key)
        service = self.services.get(route[:2]) if route else None
        endpoints = ready_endpoints(service, route[2], self.pods) if service and route else []
        if not endpoints:
            writer.close()  # as kube-proxy rejects a Service without ready endpoints
            return
        host, port = endpoints[next(self._turn) % len(endpoints)]
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (TimeoutError, OSError):
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def run(self, stop: asyncio.Event) -> None:
        # A relist every second: Services and endpoints of a test cluster change little, and a
        # relist cannot miss an event the way an unwatched gap can.
        while not stop.is_set():
            try:
                await self.sync()
            except (TimeoutError, ApiError, aiohttp.ClientError, ValueError) as exc:
                log.warning("sync failed: %r", exc)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
        for server in self.servers.values():
            server.close()
        await self.kube.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m e2e.service_proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--service-cidr", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await ServiceProxy(args.kubeconfig, args.service_cidr).run(stop)

    asyncio.run(go())


if __name__ == "__main__":
    main()
