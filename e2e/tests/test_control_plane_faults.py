"""Control-plane faults, end to end: the API server SIGKILLed and restarted mid-rollout, etcd
SIGKILLed and restarted with a change pending, the API server reached through a slow and flaky
network, a second writer fighting the operator over a field it owns, and watches that expire
(410 Gone) while the operator is stopped.

Each test checks that every model ends as it would without the fault (served by the revision its
spec asks for, with its replicas; a rollout promoted with its old revision retired), that no rollout
step is applied twice (the CanaryWeight Events), and that no write is lost: changes made just
before or during the fault are applied afterwards.

On a small cluster of its own (port base 23443; kwok GPU nodes only), shared by the module's tests,
each test in its own namespace with its own operator, so stopping this API server or etcd disturbs
no other test. Models run on kwok nodes (no real weights): rollouts have weight and pause steps
only (an evaluation needs pods that answer).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import textwrap
import threading
import time
import uuid

import pytest
from kubernetes import client, config

from e2e.cluster import IMAGES_FILE, Cluster, built_images, urlopen
from e2e.operator_proc import OperatorProcess, audit_writes
from e2e.tcp_fault_proxy import TcpFaultProxy
from e2e.tests.test_api_server_pause import frozen
from e2e.tests.test_smallmodel import GROUP, PLURAL, QWEN_05B, VERSION, condition, model_body
from e2e.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PORT_BASE = 23443
METRICS_PORT, PROXY_METRICS_PORT, RESYNC_METRICS_PORT, STORM_METRICS_PORT = 18591, 18592, 18593, 18594
L4, A100 = "NVIDIA-L4", "NVIDIA-A100-SXM4-80GB"
POOLS = textwrap.dedent(f"""
    # Two nodes of four L4s for the models; one A100 that test 5's blocking pod holds.
    podCIDRFirstOctet: 210
    pools:
      - name: l4
        nodes: 2
        cpu: 64
        memory: 256Gi
        gpu: {{product: {L4}, memoryMiB: 23034, count: 4, family: ada-lovelace, computeMajor: 8, computeMinor: 9}}
      - name: a100
        nodes: 1
        cpu: 64
        memory: 256Gi
        gpu: {{product: {A100}, memoryMiB: 81920, count: 1, family: ampere, computeMajor: 8, computeMinor: 0}}
""")
MR_PLURAL = "modelrollouts"
CONVERGE = 180  # generous: two cores, other clusters beside this one
RESYNC_SECONDS = 15
# One replica without leader election: with it, a leader that cannot renew its Lease for
# renewDeadlineSeconds (10 s) exits by design (controller/leader.py) and lives on only through its
# restart, and a leader stopped with SIGSTOP must exit when continued. These tests are about what
# one operator process makes of the control plane's faults, so they run it without.
SOLO = {"leaderElection": {"enabled": False}}
CASES = [{"prompt": f"What is {i} + {i}?", "expected": str(2 * i)} for i in range(10)]


def digest(n: int) -> str:
    return "sha256:" + f"{n:02x}" * 32


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fault_cluster(tmp_path_factory):
    if not built_images():  # the operator's config names the built images (operator_proc.write_config)
        pytest.fail(f"no built images in {IMAGES_FILE}: run `make images` (make test does)")
    base = tmp_path_factory.mktemp("cp-faults")
    pools = base / "pools.yaml"
    pools.write_text(POOLS)
    cluster = Cluster(base / "cluster", PORT_BASE)
    try:
        cluster.up(pools, reuse=False)
        yield cluster
    finally:
        if cluster.logs.exists():  # the state goes with the cluster: its logs stay for a post-mortem
            shutil.copytree(cluster.logs, base / "logs", dirs_exist_ok=True)
        cluster.down()


@pytest.fixture(scope="module")
def api(fault_cluster):
    api = config.new_client_from_config(config_file=str(fault_cluster.kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="module")
def core(api):
    return client.CoreV1Api(api)


@pytest.fixture(scope="module")
def crs(api):
    return client.CustomObjectsApi(api)


@pytest.fixture(scope="module")
def apps(api):
    return client.AppsV1Api(api)


@pytest.fixture
def ns(core, crs, fault_cluster, tmp_path, request):
    """The test's namespace with the claim `weights` the models read from, bound."""
    name = f"cpf-{request.node.name[5:25].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:4]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    pv = f"{name}-weights"
    core.create_persistent_volume({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "hostPath": {"path": str(tmp_path)}, "claimRef": {"namespace": name, "name": "weights"}}})
    core.create_namespaced_persistent_volume_claim(name, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "weights"},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                 "resources": {"requests": {"storage": "1Gi"}}}})
    wait_for(lambda: core.read_namespaced_persistent_volume_claim("weights", name).status.phase == "Bound",
             60, what="claim bound")
    yield name
    # The API server must be up for the clean-up (a failed test may have left it down).
    for component in ("etcd", "kube-apiserver"):
        if not fault_cluster._running(component):
            fault_cluster.restart(component)
    for plural in (MR_PLURAL, PLURAL):
        crs.delete_collection_namespaced_custom_object(GROUP, VERSION, name, plural)
    core.delete_namespace(name, grace_period_seconds=0)
    core.delete_persistent_volume(pv)


@pytest.fixture
def operator(fault_cluster):
    op = OperatorProcess(fault_cluster, metrics_port=METRICS_PORT, config_overrides=SOLO).start(timeout=120)
    yield op
    op.stop()


# ------------------------------------------------------------------------------------------ helpers


def l4_model(name: str, replicas: int = 1, n: int = 1) -> dict:
    return model_body(name, QWEN_05B, serving={"maxModelLen": 4096, "replicas": replicas},
                      source={"uri": "pvc://weights/model", "digest": digest(n)},
                      resources={"gpuProducts": [L4]})


def rollout_body(name: str, steps: list[dict]) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRollout", "metadata": {"name": name},
            "spec": {"modelRef": {"name": name}, "steps": steps, "scaleDownDelaySeconds": 0,
                     "evaluation": {"dataset": {"inline": CASES}, "scorers": [{"type": "exactMatch"}],
                                    "sampleSize": 10}}}


def get(crs, ns: str, name: str, plural: str = PLURAL) -> dict:
    return crs.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)


def create(crs, ns: str, body: dict, plural: str = PLURAL) -> dict:
    return crs.create_namespaced_custom_object(GROUP, VERSION, ns, plural, body)


def patch(crs, ns: str, name: str, spec: dict) -> dict:
    return crs.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": spec})


def serving(crs, ns: str, name: str, replicas: int) -> dict | None:
    """The model, once Ready for its current generation with `replicas` ready replicas."""
    obj = get(crs, ns, name)
    ready = condition(obj, "Ready")
    done = (ready.get("status") == "True" and ready.get("observedGeneration") == obj["metadata"]["generation"]
            and (obj.get("status") or {}).get("readyReplicas") == replicas)
    return obj if done else None


def wait_serving(crs, ns: str, name: str, replicas: int = 1, timeout: float = CONVERGE) -> dict:
    return wait_for(lambda: serving(crs, ns, name, replicas), timeout, 0.5, f"{name} Ready with {replicas} replicas")


def wait_phase(crs, ns: str, name: str, *phases: str, timeout: float = CONVERGE) -> dict:
    last: list[dict] = [{}]

    def check():
        obj = get(crs, ns, name, MR_PLURAL)
        last[0] = obj.get("status") or {}
        return obj if last[0].get("phase") in phases else None
    try:
        return wait_for(check, timeout, 0.3, f"rollout {name} in {phases}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; its status: {last[0]}; the model's: {get(crs, ns, name).get('status')}") from None


def canary_weights(core, ns: str, name: str) -> list[str]:
    items = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [e.message or "" for e in items if e.reason == "CanaryWeight"]


def assert_promoted_once(core, crs, apps, ns: str, name: str, stable: str, weights: list[int],
                         replicas: int = 1) -> dict:
    """The rollout of `name` away from revision `stable` ends as without a fault: Promoted, the
    model served by the candidate with its replicas, the stable retired; and each weight step was
    applied (announced) once. Returns the model."""
    done = wait_phase(crs, ns, name, "Promoted", "RolledBack", "Failed")
    assert done["status"]["phase"] == "Promoted", done["status"]
    candidate = done["status"]["candidateRevision"]
    assert candidate != stable

    def promoted():
        m = get(crs, ns, name)
        return m if m["status"].get("servingRevision") == candidate and serving(crs, ns, name, replicas) else None
    model = wait_for(promoted, CONVERGE, 0.5, f"{name} served by the candidate {candidate}")
    assert model["status"]["revision"] == candidate
    assert [h["outcome"] for h in model["status"]["history"]][-2:] == ["Replaced", "Promoted"]
    wait_for(lambda: {d.metadata.name for d in apps.list_namespaced_deployment(
        ns, label_selector=f"slmfleet.io/model={name}").items} == {f"{name}-{candidate}"},
        CONVERGE, 0.5, f"only {name}-{candidate} left (the stable retired)")
    wait_for(lambda: (core.read_namespaced_service(name, ns).spec.selector or {}).get("slmfleet.io/revision") == candidate,
             60, 0.5, "the model's Service on the candidate")
    # Events follow the status write they announce: the last one may come a moment later. A fault
    # may take an Event with it (at most one per step); a step applied twice would show twice.
    # (Events are best effort: one posted through a cut connection is gone, so none is required.)
    deadline = time.monotonic() + 15
    messages = canary_weights(core, ns, name)
    while not any("-> 100%" in m for m in messages) and time.monotonic() < deadline:
        time.sleep(0.5)
        messages = canary_weights(core, ns, name)
    for weight in weights:
        assert len([m for m in messages if f"-> {weight}%" in m]) <= 1, messages
    assert not [m for m in messages if "re-applying" in m], messages
    return model


def alive(op: OperatorProcess) -> None:
    assert op.proc is not None and op.proc.poll() is None, f"the operator exited; see {op.log_path}"


def healthz_recovers(op: OperatorProcess) -> None:
    alive(op)
    wait_for(op.healthy, 120, 0.5, "the operator's /healthz healthy")


# ------------------------------------------------------------------------------------------ 1. API server SIGKILL


def test_api_server_killed_and_restarted_mid_rollout(fault_cluster, operator, core, crs, apps, ns):
    """The API server SIGKILLed while a rollout pauses at 50%, with a change handed to it just before
    the kill; restarted with the same argv and ports: the rollout resumes and is promoted without
    repeating a step, and the change is applied."""
    create(crs, ns, l4_model("roll"))
    create(crs, ns, l4_model("other"))
    stable = wait_serving(crs, ns, "roll")["status"]["revision"]
    wait_serving(crs, ns, "other")
    create(crs, ns, rollout_body("roll", [{"setWeight": 50}, {"pause": {"duration": "15s"}}, {"setWeight": 100}]),
           MR_PLURAL)
    patch(crs, ns, "roll", {"source": {"uri": "pvc://weights/model", "digest": digest(2)}})
    paused = wait_phase(crs, ns, "roll", "Paused")
    assert paused["status"]["canaryWeight"] == 50

    # The operator frozen while the change is made, so it meets the dead API server with it (or
    # sees it only through its watches resumed after the restart): either way it must be applied.
    with frozen(operator.proc.pid):
        patch(crs, ns, "other", {"serving": {"replicas": 2}})
        fault_cluster.kill("kube-apiserver")
    time.sleep(5)  # the operator runs against no API server at all
    alive(operator)
    fault_cluster.restart("kube-apiserver")

    assert_promoted_once(core, crs, apps, ns, "roll", stable, [50, 100])
    wait_serving(crs, ns, "other", 2)
    create(crs, ns, l4_model("after"))  # the operator's watches work again
    wait_serving(crs, ns, "after")
    healthz_recovers(operator)


# ------------------------------------------------------------------------------------------ 2. etcd SIGKILL


def test_etcd_killed_and_restarted_with_a_change_pending(fault_cluster, operator, core, crs, apps, ns):
    """etcd SIGKILLed right after a new digest (a rollout to run) and a scale-up were stored, and
    restarted on the same data dir: both are applied, the rollout promoted once per step."""
    create(crs, ns, l4_model("e1"))
    create(crs, ns, l4_model("e2"))
    stable = wait_serving(crs, ns, "e1")["status"]["revision"]
    wait_serving(crs, ns, "e2")
    create(crs, ns, rollout_body("e1", [{"setWeight": 50}, {"setWeight": 100}]), MR_PLURAL)
    with frozen(operator.proc.pid):
        patch(crs, ns, "e1", {"source": {"uri": "pvc://weights/model", "digest": digest(3)}})
        patch(crs, ns, "e2", {"serving": {"replicas": 2}})
        fault_cluster.kill("etcd")
    time.sleep(5)  # the operator's reads and writes fail: the API server has no storage
    alive(operator)
    fault_cluster.restart("etcd")
    wait_for(fault_cluster.healthy, 120, 0.5, "the API server ready again (etcd reachable)")

    assert_promoted_once(core, crs, apps, ns, "e1", stable, [50, 100])
    wait_serving(crs, ns, "e2", 2)
    create(crs, ns, l4_model("e3"))
    wait_serving(crs, ns, "e3")
    healthz_recovers(operator)


# ------------------------------------------------------------------------------------------ 3. slow, flaky network


def test_a_slow_and_flaky_api_server_connection_converges(fault_cluster, core, crs, apps, ns):
    """The operator reaches the API server through a TCP proxy that delays every chunk by 0.3 s
    and cuts every connection every 4 s, for about 30 s, while a rollout runs, a model is created
    and another scaled: after the faults stop all converge and /healthz is healthy."""
    proxy = TcpFaultProxy(fault_cluster.ports.apiserver)
    proxy.start()
    op = OperatorProcess(fault_cluster, metrics_port=PROXY_METRICS_PORT, server=proxy.url,
                         config_overrides=SOLO)
    stop = threading.Event()
    try:
        op.start(timeout=120)
        create(crs, ns, l4_model("p1"))
        create(crs, ns, l4_model("p3"))
        stable = wait_serving(crs, ns, "p1")["status"]["revision"]
        wait_serving(crs, ns, "p3")
        create(crs, ns, rollout_body("p1", [{"setWeight": 50}, {"pause": {"duration": "5s"}}, {"setWeight": 100}]),
               MR_PLURAL)

        def cut_every(seconds: float) -> None:
            while not stop.wait(seconds):
                proxy.drop_all()

        proxy.latency = 0.3
        cutter = threading.Thread(target=cut_every, args=(4,), daemon=True)
        cutter.start()
        patch(crs, ns, "p1", {"source": {"uri": "pvc://weights/model", "digest": digest(4)}})
        create(crs, ns, l4_model("p2"))
        time.sleep(10)
        patch(crs, ns, "p3", {"serving": {"replicas": 2}})
        time.sleep(20)
        healthy_during = op.healthy()
        stop.set()
        cutter.join(10)
        proxy.latency = 0
        print(f"proxy: {proxy.stats}; /healthz at the end of the faults: {healthy_during}")
        assert proxy.stats["dropped"] >= 5, proxy.stats

        assert_promoted_once(core, crs, apps, ns, "p1", stable, [50, 100])
        wait_serving(crs, ns, "p2")
        wait_serving(crs, ns, "p3", 2)
        healthz_recovers(op)
    finally:
        stop.set()
        op.stop()
        proxy.stop()


# ------------------------------------------------------------------------------------------ 4. conflict storm


def test_a_conflict_storm_over_the_replicas_ends_with_the_operators_value_without_a_hot_loop(
        fault_cluster, core, crs, apps, ns):
    """Another field manager sets the replicas of the operator's Deployment to 3 every 1.5 s for
    about 30 s, by server-side apply with force and by plain patches in turn. The operator takes
    the field back each time, once: its writes during the storm are bounded by the fights, and
    afterwards the Deployment has the operator's replicas again and the model is served."""
    op = OperatorProcess(fault_cluster, metrics_port=STORM_METRICS_PORT, config_overrides=SOLO).start(timeout=120)
    try:
        create(crs, ns, l4_model("c1"))
        revision = wait_serving(crs, ns, "c1")["status"]["revision"]
        name = f"c1-{revision}"
        time.sleep(3)  # the model's last status write is in the audit log before the count starts
        start_line, _ = audit_writes(fault_cluster)
        fights = {"apply": 0, "patch": 0}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (fights["apply"] + fights["patch"]) % 2 == 0:
                fault_cluster._kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=intruder",
                                       "-f", "-", input=json.dumps({
                                           "apiVersion": "apps/v1", "kind": "Deployment",
                                           "metadata": {"name": name, "namespace": ns}, "spec": {"replicas": 3}}))
                fights["apply"] += 1
            else:
                apps.patch_namespaced_deployment(name, ns, {"spec": {"replicas": 3}}, field_manager="intruder-patch")
                fights["patch"] += 1
            time.sleep(1.5)
        total = fights["apply"] + fights["patch"]

        wait_for(lambda: apps.read_namespaced_deployment(name, ns).spec.replicas == 1, 60, 0.3,
                 "the Deployment back at the operator's 1 replica")
        wait_serving(crs, ns, "c1")
        time.sleep(5)  # what the storm's last fight set off has settled
        _, writes = audit_writes(fault_cluster, since_line=start_line)
        by_kind: dict[str, int] = {}
        for entry in writes:
            ref = entry.get("objectRef") or {}
            key = f"{entry['verb']} {ref.get('resource')}{'/' + ref['subresource'] if ref.get('subresource') else ''}"
            by_kind[key] = by_kind.get(key, 0) + 1
        deployment_writes = sum(v for k, v in by_kind.items() if k.endswith(" deployments"))
        print(f"conflict storm: {total} fights ({fights}); operator writes {len(writes)}: {by_kind}")
        assert deployment_writes >= total // 2, f"the operator did not fight back: {by_kind}, {total} fights"
        assert deployment_writes <= total + 2, f"more Deployment writes than fights: {by_kind}, {total} fights"
        # Each fight really scales the Deployment up and down (its ReplicaSet makes pods before the
        # operator's value is back): the model's readyReplicas and conditions follow, a few status
        # writes and Events per fight. Bounded per fight, where a hot loop would not be.
        status_writes = sum(v for k, v in by_kind.items() if k.endswith("/status"))
        assert status_writes <= 6 * total, f"status writes beyond the state changes? {by_kind}, {total} fights"
        assert len(writes) <= 9 * total, f"a hot loop? {len(writes)} writes for {total} fights: {by_kind}"
        # Once quiet, quiet: no write at all for 10 s.
        settled, _ = audit_writes(fault_cluster)
        time.sleep(10)
        _, later = audit_writes(fault_cluster, since_line=settled)
        assert not later, f"the operator kept writing after the storm: {[(e['verb'], e['objectRef']) for e in later]}"
        dep = apps.read_namespaced_deployment(name, ns)
        owners = [f.manager for f in dep.metadata.managed_fields or []
                  if f.fields_v1 and "f:replicas" in (f.fields_v1.get("f:spec") or {})]
        assert owners == ["slmfleet"], owners
        healthz_recovers(op)
    finally:
        op.stop()


# ------------------------------------------------------------------------------------------ 5. watch expiry (410)


def etcd_post(cluster: Cluster, path: str, body: dict) -> dict:
    """etcd's gRPC gateway (plain HTTP on the client port in this cluster: no TLS)."""
    req = json.dumps(body).encode()
    import urllib.request
    request = urllib.request.Request(f"http://127.0.0.1:{cluster.ports.etcd_client}{path}", data=req,
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def compact_etcd(cluster: Cluster) -> int:
    """Compacts etcd's history up to its current revision (physically): a watch from any older
    resourceVersion gets 410 Gone. The revision compacted to."""
    header = etcd_post(cluster, "/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]
    revision = int(header["revision"])
    etcd_post(cluster, "/v3/kv/compaction", {"revision": revision, "physical": True})
    return revision


def test_watches_expired_while_the_operator_was_stopped_a_pod_deleted_meanwhile_is_forgotten(
        fault_cluster, core, crs, apps, ns):
    """A pod that is not a model's holds the only A100; a model that fits only there waits. The
    operator is stopped (SIGSTOP); the pod is deleted; etcd's history compacted and the API server
    restarted without a watch cache, so the operator's watches, resumed from their old
    resourceVersions, get 410 Gone and list again, and no DELETED event ever tells it the pod went.
    Its periodic full resync (resyncSeconds) must drop the pod: the model is then placed on the A100.

    Depends on the operator's own stores with a periodic full resync (`resyncSeconds` in its
    config): without it, the operator does not start with this config (unknown key)."""
    blocker = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu-holder"},
               "spec": {"nodeSelector": {"nvidia.com/gpu.product": A100},
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": "c", "image": "registry.invalid/holder:1",
                                        "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}
    core.create_namespaced_pod(ns, blocker)
    wait_for(lambda: core.read_namespaced_pod("gpu-holder", ns).status.phase == "Running", 60, 0.5,
             "the GPU-holding pod running")
    op = OperatorProcess(fault_cluster, metrics_port=RESYNC_METRICS_PORT,
                         config_overrides={**SOLO, "resyncSeconds": RESYNC_SECONDS})
    try:
        op.start(timeout=120)
        body = model_body("late", QWEN_05B, serving={"maxModelLen": 4096}, resources={"gpuProducts": [A100]})
        create(crs, ns, body)

        def waiting():
            m = get(crs, ns, "late")
            return m if condition(m, "Ready").get("status") == "False" and (m.get("status") or {}).get(
                "observedGeneration", m["metadata"]["generation"]) == m["metadata"]["generation"] else None
        before = wait_for(waiting, 60, 0.5, "the model not Ready: its only GPU is held")
        print(f"before: {[(c['type'], c['status'], c.get('reason')) for c in before['status']['conditions']]}")
        time.sleep(3)
        assert not serving(crs, ns, "late", 1), "the model must not be served while its GPU is held"

        os.kill(op.proc.pid, signal.SIGSTOP)
        try:
            # Cut the stopped operator's watch connections first: an API server that is still
            # connected would put the pod's DELETED event into the socket, and the operator would
            # read it when it runs again.
            fault_cluster.kill("kube-apiserver")
            fault_cluster.restart("kube-apiserver")
            core.delete_namespaced_pod("gpu-holder", ns, grace_period_seconds=0)
            wait_for(lambda: not [p for p in core.list_namespaced_pod(ns).items if p.metadata.name == "gpu-holder"],
                     60, 0.5, "the GPU-holding pod gone")
            # More writes after the deletion, so that the compacted history is past it.
            for i in range(3):
                core.create_namespaced_config_map(ns, {"metadata": {"name": f"filler-{i}"}})
            revision = compact_etcd(fault_cluster)
            fault_cluster.kill("kube-apiserver")
            fault_cluster.restart("kube-apiserver", set_flags={"--watch-cache": "false"})
        finally:
            os.kill(op.proc.pid, signal.SIGCONT)
        print(f"etcd compacted to revision {revision}; API server restarted without a watch cache")

        wait_serving(crs, ns, "late", 1, timeout=CONVERGE + 2 * RESYNC_SECONDS)
        model = get(crs, ns, "late")
        assert model["status"]["placement"]["gpuProduct"] == A100
        healthz_recovers(op)
        log = op.log_text()
        # The full listing, not a watch event, is what dropped the pod (registry.sync logs it).
        assert re.search(r"full listing of pods: [1-9]\d* dropped that the watches had missed", log), log[-3000:]
    finally:
        op.stop()
