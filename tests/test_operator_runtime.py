"""The operator's runtime glue without a cluster: seeing its own writes, and failures in status."""

from __future__ import annotations

import asyncio

from slmfleet.api.config import OperatorConfig
from slmfleet.controller import deprecations, main, reconcile, registry
from slmfleet.controller import runtime as op

CONFIG = OperatorConfig.model_validate({
    "vllmImage": "vllm/vllm-openai@sha256:" + "a" * 64, "loaderImage": "slmfleet/slmfleet@sha256:" + "b" * 64})


def obj(kind: str, name: str, rv: str, uid: str = "u1", **extra) -> dict:
    return {"kind": kind, "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv, "uid": uid}, **extra}


class FakeClient:
    def __init__(self) -> None:
        self.statuses: list[dict] = []
        self.events: list[tuple[str, str, str]] = []

    async def patch_status(self, ref, status):
        self.statuses.append(status)
        return {"kind": "SmallModel", "metadata": {"name": ref.name, "namespace": ref.namespace}, "status": status}

    async def post_event(self, ref, type_, reason, message):
        self.events.append((type_, reason, message))


def runtime(client=None) -> op.Runtime:
    return op.Runtime(config=CONFIG, client=client or FakeClient())


def test_own_writes_replace_the_stale_cache_until_the_watch_catches_up():
    rt = runtime()
    cached = obj("Deployment", "m-r1", "1", spec={"replicas": 1})
    written = obj("Deployment", "m-r1", "2", spec={"replicas": 2})
    rt.writes.remember(cached, written)
    assert rt.writes.fresh("Deployment", "ns", [cached]) == [written]
    caught_up = obj("Deployment", "m-r1", "2", spec={"replicas": 2})
    assert rt.writes.fresh("Deployment", "ns", [caught_up]) == [caught_up]
    assert rt.writes.own_writes == {}


def test_a_created_object_is_seen_before_its_watch_event_and_a_deleted_one_is_not():
    rt = runtime()
    created = obj("Service", "m", "5")
    rt.writes.remember(None, created)
    assert rt.writes.fresh("Service", "ns", [], "m") == [created]
    assert rt.writes.fresh("Service", "ns", [], "other") == []
    gone = obj("Service", "old", "3", uid="u9")
    rt.writes.deleted.add(("Service", "ns", "old", "u9", "m"))
    rt.writes.fresh("Service", "ns", [], "other")  # another model's reconcile must not forget it
    assert gone not in rt.writes.fresh("Service", "ns", [gone], "m")
    rt.writes.fresh("Service", "ns", [], "m")  # the watch delivered the deletion
    assert rt.writes.deleted == set()


def test_two_writes_before_the_watch_catches_up_still_show_the_newest():
    rt = runtime()
    v1 = obj("SmallModel", "m", "1")
    v2 = obj("SmallModel", "m", "2", status={"a": 1})
    v3 = obj("SmallModel", "m", "3", status={"a": 2})
    rt.writes.remember(v1, v2)
    rt.writes.remember(v2, v3)  # decided from the overlay, before the cache saw v2
    assert rt.writes.fresh("SmallModel", "ns", [v1], "m") == [v3]
    assert rt.writes.fresh("SmallModel", "ns", [v2], "m") == [v3]
    assert rt.writes.fresh("SmallModel", "ns", [v3], "m") == [v3] and rt.writes.own_writes == {}


class Store(dict):
    """The part of kopf's index interface the operator uses: index.get(key, default) -> values."""


def test_a_reconcile_that_keeps_failing_says_so_in_the_status(monkeypatch):
    client = FakeClient()
    rt = runtime(client)
    body = {"apiVersion": "slmfleet.io/v1alpha1", "kind": "SmallModel",
            "metadata": {"name": "m", "namespace": "ns", "uid": "u", "generation": 4}, "spec": {}, "status": {}}
    rt.indices = {name: Store() for name in op.INDEX_NAMES}
    rt.indices["slm_models"][("ns", "m")] = [body]
    rt.weights = None

    def boom(*_args, **_kwargs):
        raise RuntimeError("the planner broke")

    monkeypatch.setattr(reconcile, "plan_model", boom)

    async def run():
        for _ in range(op.REPORT_AFTER_FAILURES + 1):
            await reconcile.reconcile(rt, ("ns", "m"))

    asyncio.run(run())
    assert len(client.statuses) == 1, "reported once, not on every retry"
    [cond] = [c for c in client.statuses[0]["conditions"] if c["type"] == "Degraded"]
    assert (cond["status"], cond["reason"], cond["observedGeneration"]) == ("True", "ReconcileError", 4)
    assert "the planner broke" in cond["message"]
    assert client.events[0][:2] == ("Warning", "ReconcileError")
    assert rt.failures[("ns", "m")] == op.REPORT_AFTER_FAILURES + 1


def test_node_heartbeats_are_not_changes_but_capacity_is():
    rt = runtime()
    rt.conditions[("ns", "waiting")] = {"Ready": "False"}  # a model that did not fit yet
    node = {"metadata": {"name": "n1", "labels": {"nvidia.com/gpu.product": "NVIDIA-L4",
                                                   "nvidia.com/gpu.memory": "23034"}},
            "status": {"allocatable": {"nvidia.com/gpu": "1"},
                       "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "t1"}]}}

    def wakes(gone: bool = False) -> bool:
        registry.record(rt, registry.node_entries(node), gone=gone)
        woken = rt.queue.busy
        rt.queue = type(rt.queue)()
        return woken

    assert wakes()
    node["status"]["conditions"][0]["lastHeartbeatTime"] = "t2"
    assert not wakes()
    node["status"]["allocatable"]["nvidia.com/gpu"] = "2"
    assert wakes()
    assert [n.allocatable for n in rt.cluster.inventory().nodes] == [2]
    assert wakes(gone=True)
    assert not wakes(gone=True)
    assert rt.cluster.inventory().nodes == ()


def test_the_deprecations_list_is_read_before_any_reconcile_and_a_broken_one_keeps_the_last(monkeypatch):
    class ListClient(FakeClient):
        def __init__(self, texts):
            super().__init__()
            self.texts = list(texts)

        async def read_config_map(self, namespace, name):
            assert (namespace, name) == ("slmfleet-system", "slmfleet-deprecations")
            return {"deprecations.yaml": self.texts.pop(0) if len(self.texts) > 1 else self.texts[0]}

    good = "deprecations:\n- baseModel: org/old\n  reason: withdrawn\n"
    client = ListClient([good, "deprecations:\n- baseModel: org/old\n  reson: typo\n"])
    config = OperatorConfig.model_validate({**CONFIG.to_wire(), "deprecations": {
        "namespace": "slmfleet-system", "name": "slmfleet-deprecations"}})
    rt = op.Runtime(config=config, client=client)
    monkeypatch.setattr(deprecations, "DEPRECATIONS_POLL_SECONDS", 0.01)

    async def run() -> None:
        task = asyncio.create_task(deprecations.watch_deprecations(rt))
        await asyncio.wait_for(rt.deprecations_ready.wait(), 1)
        assert [d.base_model for d in rt.deprecations.entries] == ["org/old"]
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(run())
    assert [d.base_model for d in rt.deprecations.entries] == ["org/old"], "the typo un-deprecated nothing"
    assert [(t, r) for t, r, _ in client.events] == [("Warning", "InvalidDeprecations")]
    assert "reson" in client.events[0][2]


def test_the_slim_pod_keeps_what_says_an_image_cannot_be_pulled():
    from slmfleet.controller.registry import _slim_pod
    from slmfleet.planning.status import image_pull_failure

    body = {"metadata": {"name": "p", "namespace": "ns", "labels": {"slmfleet.io/revision": "r1"}},
            "spec": {"containers": [{"name": "vllm"}]},
            "status": {"phase": "Pending", "containerStatuses": [
                {"name": "vllm", "image": "reg/vllm@sha256:" + "1" * 64, "imageID": "",
                 "state": {"waiting": {"reason": "ImagePullBackOff", "message": "registry text"}}}]}}
    slim = _slim_pod(body)  # type: ignore[arg-type]
    assert slim["status"]["containerStatuses"] == [
        {"name": "vllm", "image": "reg/vllm@sha256:" + "1" * 64, "ready": False,
         "state": {"waiting": {"reason": "ImagePullBackOff"}}, "lastState": {}}]
    message = image_pull_failure([slim], "r1")
    assert message is not None and "reg/vllm@sha256:" in message and "cannot pull" in message


def test_the_slim_pod_keeps_how_vllm_last_ended_bounded():
    from slmfleet.controller.registry import MAX_TERMINATION_MESSAGE, _slim_pod
    from slmfleet.planning.status import vllm_start_failure

    output = "x" * 10_000 + "\nValueError: the model needs more memory\n"
    body = {"metadata": {"name": "p", "namespace": "ns", "labels": {"slmfleet.io/revision": "r1"}},
            "spec": {"containers": [{"name": "vllm"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "vllm", "image": "i", "ready": False, "restartCount": 3,
                 "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                 "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": output,
                                              "startedAt": "t", "containerID": "c"}}}]}}
    slim = _slim_pod(body)  # type: ignore[arg-type]
    [status] = slim["status"]["containerStatuses"]
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert len(status["lastState"]["terminated"]["message"]) == MAX_TERMINATION_MESSAGE
    assert set(status["lastState"]["terminated"]) == {"exitCode", "reason", "message"}
    assert vllm_start_failure([slim], "r1") == "pod p: vLLM exited with code 1: ValueError: the model needs more memory"
    body["status"]["containerStatuses"][0]["ready"] = True  # restarted and serving: not failing
    assert vllm_start_failure([_slim_pod(body)], "r1") is None  # type: ignore[arg-type]


def test_healthz_turns_unhealthy_only_when_waiting_work_makes_no_progress():
    config = OperatorConfig(vllm_image="vllm/vllm-openai@sha256:" + "a" * 64,
                            loader_image="slmfleet/slmfleet@sha256:" + "b" * 64, workers=2, worker_stall_seconds=60)
    runtime = op.Runtime(config=config, client=None)  # type: ignore[arg-type]
    runtime.workers_alive = 2
    runtime.last_progress = 1000.0
    assert main.healthy(runtime, watching=True, now=5000.0), "idle is healthy however long ago the last reconcile was"
    assert not main.healthy(runtime, watching=False, now=1001.0)
    runtime.queue.add(("ns", "m"))
    runtime.queue.busy_since = 1000.0  # work arrived at the idle queue then (monotonic clock of the test)
    assert main.healthy(runtime, watching=True, now=1059.0)
    assert not main.healthy(runtime, watching=True, now=1061.0), "work waits and nothing finished for 60 s"
    runtime.last_progress = 1060.0  # another model's reconcile finished
    assert main.healthy(runtime, watching=True, now=1061.0)
    runtime.workers_alive = 1
    assert not main.healthy(runtime, watching=True, now=1061.0), "a worker died"


def test_work_arriving_after_a_long_idle_time_is_not_a_stall():
    config = OperatorConfig(vllm_image="vllm/vllm-openai@sha256:" + "a" * 64,
                            loader_image="slmfleet/slmfleet@sha256:" + "b" * 64, workers=1, worker_stall_seconds=60)
    runtime = op.Runtime(config=config, client=None)  # type: ignore[arg-type]
    runtime.workers_alive = 1
    runtime.last_progress = 1000.0  # the last reconcile, long ago: the cluster was quiet since
    runtime.queue.add(("ns", "m"))
    arrived = runtime.queue.busy_since
    assert arrived is not None and arrived > 1000.0
    assert main.healthy(runtime, watching=True, now=arrived + 30)
    assert not main.healthy(runtime, watching=True, now=arrived + 61), "no progress for 60 s since it arrived"

    async def process() -> None:
        key = await runtime.queue.get()
        runtime.queue.done(key)

    asyncio.run(process())
    assert not runtime.queue.busy and runtime.queue.busy_since is None


def test_a_deprecations_configmap_or_key_that_disappears_keeps_the_last_list_and_says_so(monkeypatch):
    class NotFound(Exception):
        status = 404

    class Sequence(FakeClient):
        """Each read returns the next answer (the last repeats): a text, {} (no key) or NotFound."""

        def __init__(self, answers):
            super().__init__()
            self.answers = list(answers)

        async def read_config_map(self, namespace, name):
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            if answer is NotFound:
                raise NotFound()
            return answer if isinstance(answer, dict) else {"deprecations.yaml": answer}

    good = "deprecations:\n- baseModel: org/old\n  reason: withdrawn\n"
    config = OperatorConfig.model_validate({**CONFIG.to_wire(), "deprecations": {
        "namespace": "slmfleet-system", "name": "slmfleet-deprecations"}})
    monkeypatch.setattr(deprecations, "DEPRECATIONS_POLL_SECONDS", 0.01)

    def run(client) -> op.Runtime:
        rt = op.Runtime(config=config, client=client)

        async def go() -> None:
            task = asyncio.create_task(deprecations.watch_deprecations(rt))
            await asyncio.wait_for(rt.deprecations_ready.wait(), 1)
            await asyncio.sleep(0.15)
            task.cancel()

        asyncio.run(go())
        return rt

    # Deleted, then its key renamed: the list stays, one Warning for the disappearance.
    client = Sequence([good, NotFound, NotFound, {"renamed.yaml": good}])
    rt = run(client)
    assert [d.base_model for d in rt.deprecations.entries] == ["org/old"], "a deletion un-deprecated nothing"
    assert [(t, r) for t, r, _ in client.events] == [("Warning", "DeprecationsMissing")]
    assert "keeps the previous list (1 deprecated base model)" in client.events[0][2]

    # Written again: read again.
    client = Sequence([good, NotFound, "deprecations:\n- baseModel: org/other\n  reason: licence\n"])
    assert [d.base_model for d in run(client).deprecations.entries] == ["org/other"]

    # Never there: nothing to keep, nothing deprecated, and the operator starts.
    client = Sequence([NotFound])
    rt = run(client)
    assert rt.deprecations.entries == () and rt.deprecations_ready.is_set() and client.events == []


def test_a_model_named_like_an_object_of_another_owner_leaves_it_untouched_and_says_conflict():
    from tests.test_model_plan import L4, L4_MIB, gpu_node, model_body

    class Cluster(FakeClient):
        def __init__(self) -> None:
            super().__init__()
            self.applied: list[tuple[str, str]] = []
            self.foreign = {"metadata": {"name": "qwen-chat", "namespace": "models", "uid": "pg",
                                         "ownerReferences": [{"uid": "someone-else", "controller": True}]}}

        async def get(self, api_version, kind, namespace, name):
            return self.foreign if (kind, name) == ("Service", "qwen-chat") and self.foreign else None

        async def apply(self, body):
            self.applied.append((body["kind"], body["metadata"]["name"]))
            return body

        async def patch_status(self, ref, status):
            self.statuses.append(status)
            return {**body, "status": status}

    body = model_body()
    client = Cluster()
    rt = runtime(client)
    registry.record(rt, registry.model_entries(body), gone=False)
    registry.record(rt, registry.node_entries(gpu_node("l4-a", L4, L4_MIB, 1)), gone=False)
    rt.weights = None
    key = ("models", "qwen-chat")

    asyncio.run(reconcile.reconcile(rt, key))
    assert client.applied == [], "nothing of the model applied beside the foreign Service"
    assert rt.conflicts[key] == ("v1", "Service", "qwen-chat")

    asyncio.run(reconcile.reconcile(rt, key))
    assert client.applied == []
    [cond] = [c for c in client.statuses[-1]["conditions"] if c["type"] == "Degraded"]
    assert (cond["status"], cond["reason"]) == ("True", "Conflict") and "Service qwen-chat" in cond["message"]
    assert ("Warning", "Conflict") in [(t, r) for t, r, _ in client.events]

    client.foreign = None  # its owner removed it: the model goes ahead
    asyncio.run(reconcile.reconcile(rt, key))
    assert key not in rt.conflicts
    assert ("Service", "qwen-chat") in client.applied and any(k == "Deployment" for k, _ in client.applied)


def test_without_a_deprecations_configmap_the_watcher_is_ready_and_keeps_running():
    """A task of the operator that ends stops the operator: with nothing to watch, it waits."""
    rt = runtime()

    async def go() -> bool:
        task = asyncio.create_task(deprecations.watch_deprecations(rt))
        await asyncio.wait_for(rt.deprecations_ready.wait(), 1)
        await asyncio.sleep(0.1)
        running = not task.done()
        task.cancel()
        return running

    assert asyncio.run(go())


def test_evaluations_and_scrapes_go_only_to_pods_of_the_revisions_deployment():
    from slmfleet.controller.observe import ready_pod_urls
    from slmfleet.controller.registry import _slim_pod

    def pod(name: str, ip: str, owner: str | None, host_network: bool = False) -> dict:
        refs = [{"kind": "ReplicaSet", "name": owner, "controller": True, "uid": "x"}] if owner else []
        return _slim_pod({  # type: ignore[arg-type]
            "metadata": {"name": name, "namespace": "ns", "ownerReferences": refs,
                         "labels": {"slmfleet.io/model": "m", "slmfleet.io/revision": "r1"}},
            "spec": {"containers": [{"name": "vllm"}], "hostNetwork": host_network},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})

    pods = (pod("m-r1-abc-1", "127.64.0.2", "m-r1-abc"),
            pod("forged", "127.64.0.3", None),  # the tenant's own pod with the model's labels
            pod("other-rs", "127.64.0.4", "someone-else-123"),
            pod("host", "127.64.0.5", "m-r1-abc", host_network=True))
    assert ready_pod_urls(runtime(), pods, "r1") == ["http://127.64.0.2:8000"]
    assert ready_pod_urls(runtime(), pods, None) == []


def test_a_rollout_that_stops_governing_takes_its_series_and_background_work_along():
    from slmfleet.controller import metrics, observe

    def series(metric) -> set[tuple[str, ...]]:
        return set(metric._metrics)

    metrics.CANARY_WEIGHT.labels("ns", "r").set(10)
    metrics.EVALUATION_SCORE.labels("ns", "r", "candidate", "rev-old", "exact").set(0.5)
    metrics.EVALUATION_SCORE.labels("ns", "r", "candidate", "rev-new", "exact").set(0.7)
    metrics.EVALUATION_SCORE.labels("ns", "other", "candidate", "rev-x", "exact").set(0.9)
    metrics.forget_rollout("ns", "r", keep_revisions=frozenset({"rev-new"}))
    assert ("ns", "r", "candidate", "rev-old", "exact") not in series(metrics.EVALUATION_SCORE)
    assert ("ns", "r", "candidate", "rev-new", "exact") in series(metrics.EVALUATION_SCORE)
    assert ("ns", "r") in series(metrics.CANARY_WEIGHT)

    rt = runtime()
    rt.governing[("ns", "m")] = ("ns", "r", "uid-r")
    rt.eval_models = {"uid-r/1/rev-new/step-0": ("ns", "m"), "uid-q/1/rev/step-0": ("ns", "n")}
    observe.forget_rollout(rt, ("ns", "m"))
    assert rt.eval_models == {"uid-q/1/rev/step-0": ("ns", "n")}
    assert ("ns", "r") not in series(metrics.CANARY_WEIGHT)
    assert not [k for k in series(metrics.EVALUATION_SCORE) if k[:2] == ("ns", "r")]
    assert ("ns", "other", "candidate", "rev-x", "exact") in series(metrics.EVALUATION_SCORE)
    assert ("ns", "m") not in rt.governing


def test_a_deleted_model_takes_its_rollouts_background_work_along():
    rt = runtime()
    rt.indices = {name: Store() for name in op.INDEX_NAMES}
    rt.governing[("ns", "m")] = ("ns", "r", "uid-r")
    rt.eval_models = {"uid-r/1/rev/step-0": ("ns", "m")}
    asyncio.run(reconcile.reconcile(rt, ("ns", "m")))  # the model is gone from the index
    assert rt.governing == {} and rt.eval_models == {}


def test_a_reconciles_calls_all_end_before_it_does_even_when_one_fails_first():
    from slmfleet.controller.execute import _all

    finished = []

    async def slow() -> str:
        await asyncio.sleep(0.2)
        finished.append("slow")
        return "slow"

    async def failing() -> str:
        raise RuntimeError("refused at once")

    async def run() -> None:
        try:
            await _all([slow(), failing()])
        except RuntimeError:
            assert finished == ["slow"], "the failure waited for the call still in flight"
        else:
            raise AssertionError("the failure was not raised")
        assert await _all([slow()]) == ["slow"]

    asyncio.run(run())


def test_models_planned_at_once_do_not_both_take_the_last_free_gpu():
    from tests.test_model_plan import L4, L4_MIB, gpu_node, model_body

    class SlowCluster(FakeClient):
        """Applies take a round trip, as on a busy API server; one may be refused."""

        def __init__(self, refuse: str = "") -> None:
            super().__init__()
            self.refuse = refuse
            self.deployments: list[str] = []

            self.bodies: dict[str, dict] = {}

        async def get(self, api_version, kind, namespace, name):
            return None

        async def patch_status(self, ref, status):
            self.statuses.append(status)
            return {**self.bodies[ref.name], "status": status}

        async def apply(self, body):
            await asyncio.sleep(0.05)
            if body["kind"] == "Deployment":
                if body["metadata"]["name"].startswith(self.refuse or "\0"):
                    raise RuntimeError("refused")
                self.deployments.append(body["metadata"]["name"])
            return body

    def two_models(client: SlowCluster) -> op.Runtime:
        rt = runtime(client)
        for name in ("first", "second"):
            body = model_body()
            body["metadata"].update(name=name, uid=f"uid-{name}")
            client.bodies[name] = body
            registry.record(rt, registry.model_entries(body), gone=False)
        registry.record(rt, registry.node_entries(gpu_node("l4-a", L4, L4_MIB, 1)), gone=False)
        rt.weights = None
        return rt

    async def both(rt: op.Runtime) -> None:
        await asyncio.gather(reconcile.reconcile(rt, ("models", "first")), reconcile.reconcile(rt, ("models", "second")))

    client = SlowCluster()
    asyncio.run(both(two_models(client)))
    assert [d.split("-")[0] for d in client.deployments] == ["first"], "one L4, one model placed on it"

    # A Deployment that was never applied reserves nothing: the next plan may use the GPU.
    client = SlowCluster(refuse="first")
    rt = two_models(client)
    asyncio.run(both(rt))
    assert client.deployments == []
    asyncio.run(reconcile.reconcile(rt, ("models", "second")))
    assert [d.split("-")[0] for d in client.deployments] == ["second"]
