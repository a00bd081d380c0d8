"""Fixtures for tests against the real local control plane.

The session fixture brings the cluster up if it is not running (reusing one that is, so a
developer's `make cluster-up` makes reruns fast) and takes it down at the end only if it started
it. Each test gets its own namespace.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest
from kubernetes import client, config

from e2e.cluster import DEFAULT_POOLS, Cluster, default_state_dir
from e2e.operator_proc import OperatorProcess
from e2e.s3 import S3Server

pytestmark = pytest.mark.e2e

# The e2e operator gives up on a placement after this many seconds of Pending pods (default 300).
PENDING_TIMEOUT = 10
OPERATOR_METRICS_PORT = 18391


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    c = Cluster(default_state_dir())
    started_here = not c.healthy()
    c.up(DEFAULT_POOLS)
    yield c
    if started_here:
        c.down()


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


@pytest.fixture(scope="session")
def core(api) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def namespace(core: client.CoreV1Api, request) -> str:
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name, grace_period_seconds=0)


def wait_for(predicate: Callable[[], object], timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


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
S3_PORT = 19000


@pytest.fixture(scope="session")
def s3(cluster):
    """A real S3 server (MinIO) on loopback with the `models` bucket, one per session."""
    server = S3Server(cluster.dir / "s3", port=S3_PORT, marker_dir=cluster.dir)
    server.start()
    server.make_bucket(BUCKET)
    yield server
    server.stop()
