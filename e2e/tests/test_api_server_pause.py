"""The API server stopped (SIGSTOP) for about 30 s while the operator has work in hand: its API
calls time out instead of hanging, /healthz turns unhealthy only when no reconcile finishes for
`workerStallSeconds` while work waits, and everything converges after SIGCONT.

On a small cluster of its own (one simulated node), with the operator as a local process, so
stopping this API server disturbs no other test.

Timing. The operator reads through watches and writes only when work arrives, in milliseconds, so
a change made just before the SIGSTOP would usually be done before it. To have the work in hand
exactly while the API server is stopped, the operator is frozen (SIGSTOP) first, with kwok (whose
node heartbeats would be other bytes on their way to the operator); the change is made; once the
API server has put the watch event into the operator's socket it is stopped, and the operator is
let go on: it reads the event, and its write meets the stopped API server.

How long that write waits depends on its connection: on one the client's pool keeps open, the
request goes out and the read timeout (30 s) ends it; a new connection's TLS handshake already
gives up after the connect timeout (5 s). Both are timeouts, enough for the first phase. The
second phase needs the 30 s wait (a 10 s threshold between two 5 s timeouts never passes), so the
pool must have a free connection then, although the deprecations poller's GET, every 5 s, may take
one at the same moment: a warm-up has the client open a second connection first.

The pause lasts as long as the operator's write takes to give up. It must stay below the node
controller's grace period (50 s) less the age of the node's lease: a node judged unreachable has
its pods marked not ready, which kwok never undoes. So each pause starts just after kwok renewed
the lease (it does every 10 s).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from kubernetes import client, config

from e2e.cluster import IMAGES_FILE, Cluster, built_images
from e2e.operator_proc import OperatorProcess
from e2e.tests.test_smallmodel import GROUP, PLURAL, QWEN_05B, VERSION, condition, create, get, model_body
from e2e.wait import wait_for
from slmfleet.controller.registry import KINDS
from slmfleet.k8s.client import REQUEST_TIMEOUT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PORT_BASE = 26743
POOLS = textwrap.dedent("""
    # One simulated node with eight L4s: its lease is renewed at one moment (see the module's docstring).
    podCIDRFirstOctet: 200
    pools:
      - name: l4
        nodes: 1
        cpu: 64
        memory: 256Gi
        gpu: {product: NVIDIA-L4, memoryMiB: 23034, count: 8, family: ada-lovelace, computeMajor: 8, computeMinor: 9}
""")
NAMESPACE = "pause"
PATIENT_PORT, STRICT_PORT = 18491, 18492
PATIENT_STALL = 60  # workerStallSeconds above the pause: /healthz must stay healthy through it
STRICT_STALL = 10  # the minimum: well below the 30 s a write waits for a stopped API server
READ_TIMEOUT = REQUEST_TIMEOUT[1]
# A write sent to the stopped API server gives up after READ_TIMEOUT; this much more is patience.
GIVE_UP_SLACK = 20
CONVERGE_TIMEOUT = 90
NO_ELECTION = {"leaderElection": {"enabled": False}}


@pytest.fixture
def small_cluster(tmp_path):
    if not built_images():  # the operator's config names the built images (operator_proc.write_config)
        pytest.fail(f"no built images in {IMAGES_FILE}: run `make images` (make test does)")
    pools = tmp_path / "pools.yaml"
    pools.write_text(POOLS)
    small = Cluster(tmp_path / "cluster", PORT_BASE)
    try:
        small.up(pools, reuse=False)
        yield small
    finally:
        small.down()


@pytest.fixture
def api(small_cluster):
    api = config.new_client_from_config(config_file=str(small_cluster.kubeconfig))
    yield api
    api.close()


def weights_claim(core: client.CoreV1Api, host_path: Path) -> None:
    """The claim `weights` the models read from (as test_smallmodel's), bound, so their pods schedule."""
    pv = f"{NAMESPACE}-weights"
    core.create_persistent_volume({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "hostPath": {"path": str(host_path)}, "claimRef": {"namespace": NAMESPACE, "name": "weights"}}})
    core.create_namespaced_persistent_volume_claim(NAMESPACE, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "weights"},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                 "resources": {"requests": {"storage": "1Gi"}}}})
    wait_for(lambda: core.read_namespaced_persistent_volume_claim("weights", NAMESPACE).status.phase == "Bound",
             60, what="claim bound")


def serving(crs: client.CustomObjectsApi, name: str, replicas: int) -> dict | None:
    """The model, once Ready for its current generation with `replicas` ready replicas."""
    obj = get(crs, NAMESPACE, name)
    ready = condition(obj, "Ready")
    done = (ready.get("status") == "True" and ready.get("observedGeneration") == obj["metadata"]["generation"]
            and (obj.get("status") or {}).get("readyReplicas") == replicas)
    return obj if done else None


def state(pid: int) -> str:
    """The process's state letter in /proc (R, S, T for stopped, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block, continued (SIGCONT) whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: state(pid) == "T", 10, 0.01, f"pid {pid} to stop")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def connections(pid: int, port: int) -> dict[str, tuple[str, int]]:
    """`pid`'s TCP connections to 127.0.0.1:`port`: socket inode -> (state as in /proc/net/tcp,
    unread bytes)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == port:
                found[fields[9]] = (fields[3], int(fields[4].split(":")[1], 16))
    return found


def unread_bytes(pid: int, port: int) -> int:
    return sum(unread for _, unread in connections(pid, port).values())


def established(pid: int, port: int) -> set[str]:
    return {inode for inode, (tcp_state, _) in connections(pid, port).items() if tcp_state == "01"}


def wait_node_leases_fresh(coordination: client.CoordinationV1Api, within: float = 4) -> None:
    """Until kwok has renewed every node's lease in the last `within` seconds."""
    def fresh() -> bool:
        now = dt.datetime.now(dt.UTC)
        leases = coordination.list_namespaced_lease("kube-node-lease").items
        return bool(leases) and all((now - lease.spec.renew_time).total_seconds() < within for lease in leases)

    wait_for(fresh, 30, 0.2, f"every node lease renewed in the last {within}s")


def failed_reconciles(log: str, name: str) -> list[str]:
    """The operator's records (each with its traceback) of failed reconciles of model `name`."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )", log)
    return [r for r in records if f"reconcile of {NAMESPACE}/{name} failed" in r]


def timed_out(log: str, name: str) -> list[str]:
    """The failed reconciles of `name` that gave up on an API call that timed out."""
    return [r for r in failed_reconciles(log, name) if "timed out" in r]


def hand_over_while_stopped(cluster: Cluster, op: OperatorProcess, change: Callable[[], object],
                            api_pause: ExitStack) -> float:
    """Makes `change` reach the operator only once the API server is stopped (the module's
    docstring), and leaves the API server stopped in `api_pause`. kwok is frozen with the operator:
    its node heartbeats are the only other writes in a quiet cluster, so the bytes that arrive are
    the change's event. The time (monotonic) just before the operator is let go on: it cannot have
    taken the work earlier."""
    apiserver, kwok = cluster._running("kube-apiserver"), cluster._running("kwok")
    assert apiserver is not None and kwok is not None
    with frozen(kwok), frozen(op.proc.pid):
        before = unread_bytes(op.proc.pid, PORT_BASE)
        change()
        wait_for(lambda: unread_bytes(op.proc.pid, PORT_BASE) > before, 10, 0.01,
                 "the watch event in the operator's socket")
        api_pause.enter_context(frozen(apiserver))
        return time.monotonic()


def poll_health(op: OperatorProcess, until: Callable[[bool], object], timeout: float,
                what: str) -> list[tuple[float, bool]]:
    """/healthz about every half second (the operator must stay alive) until `until(healthy)`
    holds: the samples, (monotonic time after the answer, healthy)."""
    samples: list[tuple[float, bool]] = []

    def check() -> object:
        assert op.proc.poll() is None, f"the operator exited with {op.proc.returncode}; see {op.log_path}"
        healthy = op.healthy()
        samples.append((time.monotonic(), healthy))
        return until(healthy)

    wait_for(check, timeout, 0.5, what)
    return samples


def since(start: float, samples: list[tuple[float, bool]]) -> list[tuple[float, bool]]:
    """The samples with their times in seconds since `start`, for messages."""
    return [(round(t - start, 1), healthy) for t, healthy in samples]


def api_writes(op: OperatorProcess) -> float:
    return sum(v for k, v in op.metrics().items() if k.startswith("slmfleet_api_writes_total"))


def wait_quiet(op: OperatorProcess, seconds: float = 1.5) -> None:
    """Until the operator has finished no write for `seconds` (a write takes milliseconds): none is
    on its way when it is frozen next."""
    last = [api_writes(op), time.monotonic()]

    def quiet() -> bool:
        writes = api_writes(op)
        if writes != last[0]:
            last[:] = [writes, time.monotonic()]
        return time.monotonic() - last[1] >= seconds

    wait_for(quiet, 30, 0.2, f"no write by the operator for {seconds}s")


def test_api_server_paused_calls_time_out_healthz_follows_progress_and_all_converges(small_cluster, api, tmp_path):
    core, crs = client.CoreV1Api(api), client.CustomObjectsApi(api)
    coordination = client.CoordinationV1Api(api)
    apiserver = small_cluster._running("kube-apiserver")
    assert apiserver is not None
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    weights_claim(core, tmp_path)

    def scale_m1(replicas: int) -> dict:
        return crs.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "m1",
                                                  {"spec": {"serving": {"replicas": replicas}}})

    # One operator, without leader election: a leader that cannot renew its Lease for renewDeadline
    # (10 s) exits by design, and this test is about one process's calls through a 30 s pause.
    patient = OperatorProcess(small_cluster, metrics_port=PATIENT_PORT,
                              config_overrides={"workerStallSeconds": PATIENT_STALL, **NO_ELECTION})
    strict = OperatorProcess(small_cluster, metrics_port=STRICT_PORT,
                             config_overrides={"workerStallSeconds": STRICT_STALL, **NO_ELECTION})
    try:
        patient.start()
        create(crs, NAMESPACE, model_body("m1", QWEN_05B, serving={"maxModelLen": 4096}))
        wait_for(lambda: serving(crs, "m1", 1), CONVERGE_TIMEOUT, 0.3, "m1 Ready with 1 replica")

        # Phase 1, workerStallSeconds 60: one more replica, handed to the operator with the API
        # server stopped. Its write gives up (a timeout) instead of hanging, and /healthz stays
        # healthy all along: the pause is shorter than the threshold and the operator makes progress.
        wait_node_leases_fresh(coordination)
        log_start = len(patient.log_text())
        with ExitStack() as api_pause:
            handed_over = hand_over_while_stopped(small_cluster, patient, lambda: scale_m1(2), api_pause)
            samples = poll_health(patient, lambda _: timed_out(patient.log_text()[log_start:], "m1"),
                                  READ_TIMEOUT + GIVE_UP_SLACK,
                                  "the operator's write to the stopped API server to time out (does it hang?)")
            assert state(apiserver) == "T", "the API server was stopped all along"
        assert all(healthy for _, healthy in samples), \
            f"/healthz unhealthy during a pause shorter than workerStallSeconds={PATIENT_STALL}: " \
            f"{since(handed_over, samples)}"
        wait_for(lambda: serving(crs, "m1", 2), CONVERGE_TIMEOUT, 0.3, "m1 Ready with 2 replicas after SIGCONT")
        assert patient.healthy()

        # Phase 2, workerStallSeconds 10, after a warm-up (the module's docstring): a new model,
        # handed over the same way. Its write waits longer than the threshold, so /healthz turns
        # unhealthy, but not before the threshold; when the write gives up, the reconcile has
        # finished (progress) and /healthz is healthy again while the API server is still stopped.
        # After SIGCONT the model is served.
        patient.stop()
        strict.start()
        # Warm-up: a third replica of m1, handed over with the API server stopped until the
        # operator's client, its one connection taken by the stalled write (or the poller's GET),
        # opens another (for the poller's GET, or the write). Both stay in its pool afterwards.
        # (kopf's connections are its watches, one per watched kind, opened at start and kept for
        # 300 s.) A client that already holds two or more, having sent a reconcile's requests at
        # once, needs no warm-up.
        wait_node_leases_fresh(coordination)
        before = established(strict.proc.pid, PORT_BASE)
        pooled_already = len(before) >= len(KINDS) + 2
        with ExitStack() as api_pause:
            hand_over_while_stopped(small_cluster, strict, lambda: scale_m1(3), api_pause)
            wait_for(lambda: pooled_already or established(strict.proc.pid, PORT_BASE) - before, 15, 0.05,
                     "the operator to open a second connection")
        wait_for(lambda: serving(crs, "m1", 3), CONVERGE_TIMEOUT, 0.3, "m1 Ready with 3 replicas")
        wait_quiet(strict)
        wait_node_leases_fresh(coordination)
        log_start = len(strict.log_text())
        with ExitStack() as api_pause:
            handed_over = hand_over_while_stopped(small_cluster, strict, lambda: create(
                crs, NAMESPACE, model_body("m2", QWEN_05B, serving={"maxModelLen": 4096})), api_pause)
            samples = poll_health(strict, lambda healthy: not healthy, READ_TIMEOUT,
                                  f"/healthz to turn unhealthy (workerStallSeconds={STRICT_STALL}, a write waiting)")
            first_unhealthy = samples[-1][0]
            assert first_unhealthy - handed_over >= STRICT_STALL, \
                f"/healthz unhealthy {first_unhealthy - handed_over:.1f}s after the work arrived, " \
                f"before workerStallSeconds={STRICT_STALL}: {since(handed_over, samples)}"
            assert not failed_reconciles(strict.log_text()[log_start:], "m2"), \
                "unhealthy while the write waits, with no reconcile of m2 finished"
            poll_health(strict, lambda _: timed_out(strict.log_text()[log_start:], "m2"),
                        READ_TIMEOUT + GIVE_UP_SLACK,
                        "the operator's write to the stopped API server to time out (does it hang?)")
            poll_health(strict, lambda healthy: healthy, STRICT_STALL,
                        "/healthz healthy again once the timed-out reconcile finished")
            assert state(apiserver) == "T", "the API server was stopped all along"
        wait_for(lambda: serving(crs, "m2", 1), CONVERGE_TIMEOUT, 0.3, "m2 Ready after SIGCONT")
        assert serving(crs, "m1", 3), "m1 still served with 3 replicas"
        wait_for(strict.healthy, 30, 0.5, "/healthz healthy after SIGCONT")
    finally:
        patient.stop()
        strict.stop()
