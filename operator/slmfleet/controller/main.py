"""The operator process: kopf, the workers, the timers, the deprecations poller and /healthz."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import kopf

from slmfleet.api.config import OperatorConfig
from slmfleet.controller import metrics
from slmfleet.controller.deprecations import watch_deprecations
from slmfleet.controller.evaluations import Evaluations, load_cases
from slmfleet.controller.execute import evaluation_done
from slmfleet.controller.leader import Election, start_election
from slmfleet.controller.reconcile import reconcile
from slmfleet.controller.registry import build_registry, keep_in_sync
from slmfleet.controller.runtime import ModelKey, Runtime
from slmfleet.controller.weights_reader import WeightsReader
from slmfleet.k8s.client import LIST_PAGE_SIZE, KubeClient

log = logging.getLogger("slmfleet.operator")


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf copies every object of every watch event (deep) to diff it against the last handled
    state, for change handlers (on.create, on.update...), and keeps that state in an annotation.
    The operator has none, only event handlers, so it needs no copy and no diff: this storage has
    nothing to build, fetch or store. It was a sixth of the operator's CPU time when a hundred
    models were created at once (bench/results/scale-profile-n100.speedscope.json)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, None)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


async def worker(runtime: Runtime, election: Election | None = None) -> None:
    """One of `config.workers`: the queue hands each model to one worker at a time. A follower's
    workers wait for leadership (controller/leader.py)."""
    if election is not None:
        await election.leading.wait()
    await runtime.indices_ready.wait()
    await runtime.deprecations_ready.wait()
    runtime.workers_alive += 1
    try:
        while True:
            key = cast(ModelKey, await runtime.queue.get())  # the queue holds model keys only
            try:
                await reconcile(runtime, key)
            finally:
                runtime.queue.done(key)
                runtime.last_progress = time.monotonic()
    finally:
        runtime.workers_alive -= 1


async def when_leading(election: Election | None, work: Any) -> None:
    """`work` (a coroutine) once this replica leads: what may write waits for leadership."""
    if election is not None:
        await election.leading.wait()
    await work


def healthy(runtime: Runtime, watching: bool, now: float, following: bool = False) -> bool:
    """/healthz: the watches are up, every worker runs, and work that is waiting gets done: no
    reconcile finishing for `workerStallSeconds` while keys wait means the workers hang, and the
    liveness probe should restart the operator. A follower is healthy while it watches."""
    if following:
        return watching
    if not watching or runtime.workers_alive < runtime.config.workers:
        return False
    queue = runtime.queue
    if not queue.busy:
        return True
    # Progress is counted from the last finished reconcile, or from when work arrived at an idle queue.
    since = max(runtime.last_progress, queue.busy_since or runtime.last_progress)
    return now - since < runtime.config.worker_stall_seconds


async def run(config: OperatorConfig, *, namespaces: list[str], kubeconfig: str | None, metrics_host: str,
              metrics_port: int, stop: asyncio.Event | None = None) -> None:
    runtime = Runtime(config=config, client=KubeClient(kubeconfig))
    election = start_election(config.leader_election, runtime.client)  # sets the client's write fence
    runtime.weights = WeightsReader(runtime.client, runtime.queue.add, config.s3_endpoints)
    runtime.evaluations = Evaluations(lambda request: load_cases(runtime.client, request, config.s3_endpoints),
                                      lambda request, outcome: evaluation_done(runtime, request, outcome))
    registry = build_registry(runtime)
    settings = kopf.OperatorSettings()
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per watch event otherwise
    settings.posting.enabled = False  # Events are ours to post, through slmfleet.k8s, never kopf's log lines
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # kopf lists every watched kind when its watch starts, and again after a 410; whole, those
    # lists were the operator's peak memory (1000 models: pods, Deployments, Services, at once).
    settings.watching.chunk_size = LIST_PAGE_SIZE
    # kopf's per-object worker keeps the object's last event while it waits for the next one: for
    # 5 s by default, so a listing of five thousand objects was alive at once. The handler only
    # records the event (registry.record), so a worker has nothing to wait for.
    settings.queueing.idle_timeout = 0.2
    # kopf's own calls (not the watches): a deadline, as for ours (k8s/client.py).
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    ready = asyncio.Event()
    kopf_stop = asyncio.Event()
    runner = await metrics.serve(metrics_host, metrics_port,
                                 lambda: healthy(runtime, ready.is_set(), time.monotonic(),
                                                 following=election is not None and not election.leading.is_set()),
                                 lambda: metrics.publish_model_gauges(runtime.conditions, runtime.gpus))
    tasks = [
        *(asyncio.create_task(worker(runtime, election), name=f"slmfleet-worker-{n}") for n in range(config.workers)),
        asyncio.create_task(runtime.queue.run_timers(), name="slmfleet-timers"),
        # Reads only: a follower keeps its view warm too, for a fast takeover.
        asyncio.create_task(keep_in_sync(runtime, namespaces), name="slmfleet-resync"),
        asyncio.create_task(when_leading(election, watch_deprecations(runtime)), name="slmfleet-deprecations"),
        *([asyncio.create_task(election.run(), name="slmfleet-leader")] if election is not None else []),
        asyncio.create_task(
            kopf.operator(
                registry=registry,
                settings=settings,
                standalone=True,
                clusterwide=not namespaces,
                namespaces=namespaces,
                ready_flag=ready,
                stop_flag=kopf_stop,
            ),
            name="kopf",
        ),
    ]
    waiters: list[asyncio.Task[Any]] = list(tasks)
    if stop is not None:
        waiters.append(asyncio.create_task(stop.wait(), name="stop"))
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.get_name() != "stop" and task.exception():
                raise task.exception()  # type: ignore[misc]
    finally:
        kopf_stop.set()
        for task in waiters:
            if task.get_name() != "kopf":
                task.cancel()
        if election is not None:
            await election.release()  # the fence closes first: no write starts after this
        await asyncio.gather(*waiters, return_exceptions=True)
        await runner.cleanup()
        await runtime.evaluations.close()
        await runtime.weights.close()
        await runtime.live_reads.close()
        await runtime.client.close()
