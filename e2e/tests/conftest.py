"""Fixtures for tests against the real local control plane.

Every session starts from a cold cluster: leftovers of an earlier run of the same state dir (a
session that crashed, a demo left running) are stopped first, with a message naming them, and the
cluster goes at the end. Each test gets its own namespace; a test that counts
things cluster-wide (audit-log writes, Events, metrics) asks for `alone`, which waits until what
other tests left for the operator (their models, the demo's, nodes they added) is gone, and a test
that runs pods on the two process nodes asks for `process_nodes_free`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client, config

from e2e.cluster import IMAGES_FILE, Cluster, built_images, default_pools, default_state_dir
from e2e.operator_proc import OperatorProcess
from e2e.s3 import S3Server

pytestmark = pytest.mark.e2e

# The e2e operator gives up on a placement after this many seconds of Pending pods (default 300).
PENDING_TIMEOUT = 10
OPERATOR_METRICS_PORT = 18391


DEMO_NAMESPACE = "slmfleet-demo"


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    if not built_images():
        pytest.fail(f"no built images in {IMAGES_FILE}: run `make images` (make test does)")
    # SLMFLEET_CLUSTER_DIR, SLMFLEET_CLUSTER_PORT_BASE and SLMFLEET_CLUSTER_POOLS run the session on a
    # second cluster beside the default one (e2e.cluster; the operator's and S3's ports stay the same).
    c = Cluster(default_state_dir())
    c.up(default_pools(), reuse=False)
    yield c
    c.down()


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


@pytest.fixture(scope="session")
def core(api) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def namespace(api: client.ApiClient, core: client.CoreV1Api, request) -> str:
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    delete_models(api, name)
    core.delete_namespace(name, grace_period_seconds=0)


def delete_models(api: client.ApiClient, namespace: str) -> None:
    """Deletes the namespace's ModelRollouts and SmallModels now. The namespace controller would get
    to them too, but only after its pods' grace period (it waits for those first), and until then
    the operator keeps acting on them: what `alone` waits for."""
    crs = client.CustomObjectsApi(api)
    for plural in ("modelrollouts", "smallmodels"):
        try:
            crs.delete_collection_namespaced_custom_object("slmfleet.io", "v1alpha1", namespace, plural)
        except client.ApiException as exc:
            if exc.status != 404:  # 404: the CRDs are not installed yet (tests without the operator)
                raise


def leftovers_of_other_tests(api: client.ApiClient, cluster: Cluster, own_namespace: str) -> list[str]:
    """What the operator would still act on from other tests (and the demo): their SmallModels and
    ModelRollouts (a deleted namespace's models live on until its controller gets to them), and
    nodes that are not in the pools."""
    crs, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    found = [f"{plural}/{o['metadata']['namespace']}/{o['metadata']['name']}"
             for plural in ("smallmodels", "modelrollouts")
             for o in crs.list_cluster_custom_object("slmfleet.io", "v1alpha1", plural)["items"]
             if o["metadata"]["namespace"] != own_namespace]
    pool_nodes = set(json.loads((cluster.dir / "cluster.json").read_text())["nodes"])
    return found + [f"node/{n.metadata.name}" for n in core.list_node().items if n.metadata.name not in pool_nodes]


@pytest.fixture
def alone(api, cluster, namespace) -> str:
    """The test's namespace, once nothing of another test is left for the operator to act on: for
    tests that count cluster-wide (a restarted operator reconciles every model it sees, and a
    deleted namespace's models keep changing state until they are gone)."""
    wait_gone(lambda: leftovers_of_other_tests(api, cluster, namespace), 180, "other tests' objects")
    return namespace


def wait_process_nodes_free(core: client.CoreV1Api, own_namespace: str | None = None, timeout: float = 180) -> None:
    """Process nodes are scarce (two with one GPU each, two CPU nodes for the real vLLM): waits until
    no pod of another namespace is left on them. A deleted namespace's pods take their grace period to go, and a model pod kept
    Pending behind them would make the e2e operator move on after PENDING_TIMEOUT seconds."""
    nodes = [n.metadata.name for n in core.list_node(label_selector="slmfleet.io/node-agent=process").items]

    def others() -> list[str]:
        return [f"{p.metadata.namespace}/{p.metadata.name}" for node in nodes
                for p in core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items
                if p.metadata.namespace != own_namespace]

    wait_gone(others, timeout, "pods of other tests on the process nodes")


@pytest.fixture
def process_nodes_free(core, namespace) -> None:
    wait_process_nodes_free(core, namespace)


def pod_gone(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    """Whether the pod is no longer in the API server (deleted and its grace period over)."""
    try:
        core.read_namespaced_pod(name, namespace)
        return False
    except client.ApiException as exc:
        return exc.status == 404


def wait_gone(find: Callable[[], list[str]], timeout: float, what: str) -> None:
    """Until `find` finds nothing; else fails naming what is still there."""
    deadline = time.monotonic() + timeout
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"{what} still there after {timeout:.0f}s: {left}"


def pod_events(core: client.CoreV1Api, namespace: str, pod: str) -> list[client.CoreV1Event]:
    return core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod}").items


@pytest.fixture
def model_dir(tmp_path: Path) -> Callable[..., Path]:
    """A weight directory for the vLLM stand-in: config.json plus standin.json behaviour."""

    def make(responses: dict[str, str] | None = None, default: str = "I don't know.",
             startup_seconds: float = 0, heads: int = 16, max_len: int = 4096) -> Path:
        d = tmp_path / f"model-{uuid.uuid4().hex[:6]}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_attention_heads": heads,
            "num_key_value_heads": 2, "hidden_size": 896, "num_hidden_layers": 24,
            "max_position_embeddings": max_len, "torch_dtype": "bfloat16"}))
        (d / "standin.json").write_text(json.dumps({
            "responses": [{"prompt": p, "completion": c} for p, c in (responses or {}).items()],
            "default_completion": default, "latency_ms": {"mean": 5, "p95": 10},
            "error_rate": 0.0, "startup_seconds": startup_seconds}))
        return d

    return make


@pytest.fixture(scope="session")
def operator(cluster):
    """The real operator, one per cluster, as the `slmfleet-operator` RBAC user."""
    op = OperatorProcess(cluster, metrics_port=OPERATOR_METRICS_PORT, pending_timeout=PENDING_TIMEOUT).start()
    yield op
    op.stop()


@pytest.fixture(scope="session")
def crs(api) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@pytest.fixture(scope="session")
def apps(api) -> client.AppsV1Api:
    return client.AppsV1Api(api)


BUCKET = "models"
# A Secret that says it holds S3 credentials: the operator sends no other (OperatorConfig.s3Endpoints).
S3_CREDENTIALS_META = {"name": "s3-creds", "labels": {"slmfleet.io/s3-credentials": "true"}}
S3_PORT = 19000


@pytest.fixture(scope="session")
def s3(cluster):
    """A real S3 server (MinIO) on loopback with the `models` bucket, one per session."""
    server = S3Server(cluster.dir / "s3", port=S3_PORT, marker_dir=cluster.dir)
    server.start()
    server.make_bucket(BUCKET)
    yield server
    server.stop()
