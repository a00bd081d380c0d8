"""What the handlers, the workers and the background tasks share: the Runtime, and the constants
of the controller."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from slmfleet.api import modelrollout
from slmfleet.api.config import OperatorConfig
from slmfleet.builders.labels import MANAGED_BY_LABEL
from slmfleet.controller.background import BackgroundReads
from slmfleet.controller.cache import WriteCache
from slmfleet.controller.evaluations import Evaluations, LiveCheck, LiveWatch
from slmfleet.controller.stores import Store
from slmfleet.controller.weights_reader import WeightsReader
from slmfleet.controller.workqueue import WorkQueue
from slmfleet.k8s.client import KubeClient
from slmfleet.planning.status import LOADER_FAILURES
from slmfleet.rollout.deprecations import Deprecations
from slmfleet.sizing.inventory import LiveInventory

log = logging.getLogger("slmfleet.operator")


ModelKey = tuple[str, str]  # (namespace, name)


MANAGED = {MANAGED_BY_LABEL: "slmfleet"}


GPU_PREFIX = "nvidia.com/"


RETRY_SECONDS = (1, 2, 5, 10, 30, 60)


REPORT_AFTER_FAILURES = 3


# Verdicts against the pinned weights, from the operator's own read or a pod's loader.
WEIGHT_FAILURES = frozenset({*LOADER_FAILURES.values(), "ManifestInvalid", "ManifestMissing"})


INDEX_NAMES = ("slm_models", "slm_deployments", "slm_services", "slm_model_pods", "slm_gpu_pods", "slm_nodes",
               "slm_rollouts")
PACKED = ("slm_models", "slm_deployments", "slm_services", "slm_rollouts")  # whole objects (see Store)


@dataclass
class Runtime:
    """What the handlers and the worker share (kopf passes it around as the operator's memo)."""

    config: OperatorConfig
    client: KubeClient
    queue: WorkQueue = field(default_factory=WorkQueue)
    # The stores (stores.py), by name: what the watches and the listings show of the cluster.
    indices: dict[str, Any] = field(default_factory=lambda: {name: Store(packed=name in PACKED) for name in INDEX_NAMES})
    cluster: LiveInventory = field(default_factory=LiveInventory)  # from slm_nodes and slm_gpu_pods
    indices_ready: asyncio.Event = field(default_factory=asyncio.Event)
    failures: dict[ModelKey, int] = field(default_factory=dict)
    conditions: dict[ModelKey, dict[str, str]] = field(default_factory=dict)
    gpus: dict[ModelKey, dict[str, int]] = field(default_factory=dict)
    workers_alive: int = 0
    last_progress: float = field(default_factory=time.monotonic)  # when a reconcile last finished
    weights: WeightsReader | None = None
    evaluations: Evaluations | None = None
    writes: WriteCache = field(default_factory=WriteCache)  # read-your-writes (cache.py)
    live: LiveWatch = field(default_factory=LiveWatch)
    deprecations: Deprecations = Deprecations()
    gateway_api: tuple[bool, float] | None = None  # (served, when checked: monotonic)
    deprecations_ready: asyncio.Event = field(default_factory=asyncio.Event)
    eval_models: dict[str, ModelKey] = field(default_factory=dict)  # evaluation id -> its model
    conflicts: dict[ModelKey, tuple[str, str, str]] = field(default_factory=dict)  # model -> foreign (apiVersion, kind, name)
    governing: dict[ModelKey, tuple[str, str, str]] = field(default_factory=dict)  # model -> its rollout (ns, name, uid)
    series_revisions: dict[ModelKey, frozenset[str]] = field(default_factory=dict)  # revisions its series keep
    live_reads: BackgroundReads[LiveCheck] = field(init=False)  # the live scrapes, off the workers

    def __post_init__(self) -> None:
        self.live_reads = BackgroundReads(self.queue.add, LIVE_SCRAPE_DEADLINE_SECONDS, "live metrics scrape")



MR_PLURAL = modelrollout.PLURAL


GATEWAY_RECHECK_SECONDS = 60.0


LIVE_CHECK_SECONDS = 10.0


# Every candidate pod's /metrics, scraped at once (each scrape has its own shorter timeout).
LIVE_SCRAPE_DEADLINE_SECONDS = 30.0


DEPRECATIONS_POLL_SECONDS = 5.0
