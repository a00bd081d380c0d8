"""A bystander: a model in a namespace of its own whose spec changes are timed from the patch to
the applied Deployment, while other tenants attack the operator (issue 13). The tenant-isolation
tests check that it keeps reconciling and report the ratio of its latencies under attack to those
without; they assert no wall-clock time."""

from __future__ import annotations

import statistics
import time
import uuid

from kubernetes import client

from e2e.tests.test_smallmodel import GROUP, QWEN_05B, VERSION
from e2e.wait import wait_for

# A change waits this long at most: far above any latency seen, so only a stalled operator fails.
CHANGE_TIMEOUT = 60


class Bystander:
    """One model on simulated (kwok) nodes; each change flips its replicas between 1 and 2."""

    def __init__(self, api: client.ApiClient, name: str = "bystander") -> None:
        self.crs, self.apps, self.core = client.CustomObjectsApi(api), client.AppsV1Api(api), client.CoreV1Api(api)
        self.name = name
        self.namespace = f"t-bystander-{uuid.uuid4().hex[:6]}"
        self.replicas = 1
        self.latencies: list[float] = []

    def start(self) -> Bystander:
        self.core.create_namespace({"metadata": {"name": self.namespace}})
        self.crs.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "smallmodels", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "SmallModel", "metadata": {"name": self.name},
            "spec": {"source": {"uri": "pvc://weights/bystander", "digest": "sha256:" + "b7" * 32},
                     "architecture": QWEN_05B, "serving": {"maxModelLen": 4096, "replicas": 1},
                     "resources": {"nodeSelector": {"slmfleet.io/node-agent": "kwok"}}}})
        self._wait_replicas(1, CHANGE_TIMEOUT * 2)
        return self

    def stop(self) -> None:
        for plural in ("modelrollouts", "smallmodels"):
            self.crs.delete_collection_namespaced_custom_object(GROUP, VERSION, self.namespace, plural)
        self.core.delete_namespace(self.namespace, grace_period_seconds=0)

    def _deployment_replicas(self) -> int | None:
        revision = ((self.crs.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "smallmodels", self.name)
                     .get("status") or {}).get("revision"))
        if revision is None:
            return None
        try:
            return self.apps.read_namespaced_deployment(f"{self.name}-{revision}", self.namespace).spec.replicas
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _wait_replicas(self, replicas: int, timeout: float) -> None:
        wait_for(lambda: self._deployment_replicas() == replicas, timeout, 0.05,
                 f"the bystander's Deployment at {replicas} replicas")

    def change_applied(self) -> float:
        """Seconds from a spec change to its Deployment applied (fails if it never is)."""
        self.replicas = 3 - self.replicas
        started = time.monotonic()
        self.crs.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, "smallmodels", self.name,
                                                {"spec": {"serving": {"replicas": self.replicas}}})
        self._wait_replicas(self.replicas, CHANGE_TIMEOUT)
        latency = time.monotonic() - started
        self.latencies.append(latency)
        return latency

    def changes_applied(self, count: int, spacing: float = 0.0) -> list[float]:
        """`count` changes, `spacing` seconds apart (so they sample a longer stretch of time)."""
        latencies = []
        for i in range(count):
            if i and spacing:
                time.sleep(spacing)
            latencies.append(self.change_applied())
        return latencies


def latency_ratio(quiet: list[float], attacked: list[float]) -> float:
    """Median latency under attack over the median without: 1.0 means the attacks cost nothing."""
    return statistics.median(attacked) / statistics.median(quiet)
