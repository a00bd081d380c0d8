"""SmallModel end to end: the real operator, as its own RBAC user, against the local control plane."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.argocd_capture import capture
from e2e.cluster import kubectl_binary
from e2e.operator_proc import OperatorProcess, audit_writes
from e2e.tests.conftest import PENDING_TIMEOUT, delete_models
from e2e.wait import wait_for

GROUP, VERSION, PLURAL = "slmfleet.io", "v1alpha1", "smallmodels"
DIGEST = "sha256:" + "5e" * 32
QWEN_05B = {
    "modelType": "qwen2", "numHiddenLayers": 24, "hiddenSize": 896, "numAttentionHeads": 14,
    "numKeyValueHeads": 2, "vocabSize": 151936, "intermediateSize": 4864, "tieWordEmbeddings": True,
    "maxPositionEmbeddings": 32768,
}
QWEN_14B = {
    "modelType": "qwen2", "numHiddenLayers": 48, "hiddenSize": 5120, "numAttentionHeads": 40,
    "numKeyValueHeads": 8, "vocabSize": 152064, "intermediateSize": 13824, "tieWordEmbeddings": False,
    "maxPositionEmbeddings": 32768,
}


@pytest.fixture(autouse=True)
def weights_claim(core, namespace, tmp_path):
    """The claim `weights` every test model reads from: a hostPath PersistentVolume bound to it, so
    pods schedule (kwok nodes ignore the volume; process nodes would mount it)."""
    pv = f"{namespace}-weights"
    core.create_persistent_volume({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "hostPath": {"path": str(tmp_path)}, "claimRef": {"namespace": namespace, "name": "weights"}}})
    core.create_namespaced_persistent_volume_claim(namespace, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "weights"},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                 "resources": {"requests": {"storage": "1Gi"}}}})
    wait_for(lambda: core.read_namespaced_persistent_volume_claim("weights", namespace).status.phase == "Bound",
             60, what="claim bound")
    yield
    core.delete_persistent_volume(pv)


def model_body(name: str, architecture: dict | None = None, **spec) -> dict:
    # Simulated (kwok) nodes only: these models have no real weights for a loader to verify.
    resources = {"nodeSelector": {"slmfleet.io/node-agent": "kwok"}}
    resources.update(spec.pop("resources", {}))
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SmallModel",
        "metadata": {"name": name},
        "spec": {"source": {"uri": "pvc://weights/model", "digest": DIGEST}, "resources": resources, **spec},
    }
    if architecture is not None:
        body["spec"]["architecture"] = architecture
    return body


def create(crs, namespace: str, body: dict) -> dict:
    return crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def get(crs, namespace: str, name: str) -> dict:
    return crs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def wait_condition(crs, namespace, name, type_, status, reason=None, timeout=60) -> dict:
    def check():
        obj = get(crs, namespace, name)
        cond = condition(obj, type_)
        gen_ok = cond.get("observedGeneration") == obj["metadata"]["generation"]
        return obj if gen_ok and cond.get("status") == status and (reason is None or cond.get("reason") == reason) else None

    return wait_for(check, timeout, 0.3, f"{name}: {type_}={status} {reason or ''}")


def model_pods(core, namespace, name) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=f"slmfleet.io/model={name}").items


def events_for(core, namespace, name) -> list[str]:
    items = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [f"{e.reason}: {e.message}" for e in items]


def test_small_model_is_placed_on_a_small_device_and_becomes_ready(operator, crs, core, apps, namespace):
    create(crs, namespace, model_body("qwen-small", QWEN_05B, serving={"maxModelLen": 8192, "concurrency": 4}))
    obj = wait_condition(crs, namespace, "qwen-small", "Ready", "True", "Serving")
    capture("SmallModel", obj, "serving")  # Argo CD: Healthy
    placement = obj["status"]["placement"]
    # A 0.5B model gets a MIG slice or an L4, never a whole H100 or A100.
    assert "MIG" in placement["gpuProduct"] or placement["gpuProduct"] == "NVIDIA-L4", placement
    assert placement["gpuCount"] == 1 and placement["tensorParallelSize"] == 1
    assert placement["reasons"], "the placement explains itself"
    revision = obj["status"]["revision"]
    dep = apps.read_namespaced_deployment(f"qwen-small-{revision}", namespace)
    assert dep.metadata.owner_references[0].kind == "SmallModel"
    container = dep.spec.template.spec.containers[0]
    assert container.resources.limits[placement["gpuResource"]] == "1"
    assert "--max-model-len" in container.args and "8192" in container.args
    # The real scheduler put the pod on a node that has that product.
    pods = model_pods(core, namespace, "qwen-small")
    node = core.read_node(pods[0].spec.node_name)
    assert placement["gpuProduct"] in node.metadata.labels.values()
    assert obj["status"]["readyReplicas"] == 1
    out = subprocess.run([kubectl_binary(), f"--kubeconfig={operator.cluster.kubeconfig}", "get", "sm", "-n", namespace],
                         capture_output=True, text=True, check=True).stdout
    assert "qwen-small" in out and placement["summary"] in out and revision in out
    assert any(e.startswith("Placed:") for e in events_for(core, namespace, "qwen-small"))


def test_spec_change_rolls_to_a_new_revision_and_retires_the_old(operator, crs, core, apps, namespace):
    create(crs, namespace, model_body("qwen-rev", QWEN_05B, serving={"maxModelLen": 4096}))
    first = wait_condition(crs, namespace, "qwen-rev", "Ready", "True")["status"]["revision"]
    patched = crs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "qwen-rev",
        {"spec": {"serving": {"maxModelLen": 4096, "extraArgs": ["--enable-prefix-caching"]}}})
    capture("SmallModel", patched, "stale-generation")  # Argo CD: Progressing until the operator catches up
    obj = wait_condition(crs, namespace, "qwen-rev", "Ready", "True", "Serving")
    second = obj["status"]["revision"]
    assert second != first
    wait_for(lambda: [d.metadata.name for d in apps.list_namespaced_deployment(namespace).items] == [f"qwen-rev-{second}"],
             60, what="only the new revision's Deployment")
    svc = core.read_namespaced_service("qwen-rev", namespace)
    assert svc.spec.selector["slmfleet.io/revision"] == second
    reasons = [e.split(":")[0] for e in events_for(core, namespace, "qwen-rev")]
    assert "NewRevision" in reasons and "RevisionRetired" in reasons


TENANT_FLAG_REFUSED = "flags the operator manages or that no tenant may set"


INVALID = [
    ("bad digest", {"spec": {"source": {"uri": "pvc://w/m", "digest": "sha256:abc"}}}, "spec.source.digest"),
    ("missing digest", {"spec": {"source": {"uri": "pvc://w/m"}}}, "spec.source.digest: Required value"),
    ("bad uri scheme", {"spec": {"source": {"uri": "https://hub/x", "digest": DIGEST}}}, "spec.source.uri"),
    ("unknown dtype", {"spec": {"serving": {"dtype": "int3"}}}, "spec.serving.dtype"),
    ("zero concurrency", {"spec": {"serving": {"concurrency": 0}}}, "spec.serving.concurrency"),
    ("too many GPUs", {"spec": {"resources": {"gpuCount": 16}}}, "spec.resources.gpuCount"),
    ("utilization above cap", {"spec": {"resources": {"maxGpuMemoryUtilization": 0.99}}}, "maxGpuMemoryUtilization"),
    (
        "managed vLLM flag",
        {"spec": {"serving": {"extraArgs": ["--tensor-parallel-size=2"]}}},
        "flags the operator manages",
    ),
    ("trust remote code", {"spec": {"serving": {"extraArgs": ["--trust-remote-code"]}}}, TENANT_FLAG_REFUSED),
    ("abbreviated managed flag", {"spec": {"serving": {"extraArgs": ["--max-model=131072"]}}}, TENANT_FLAG_REFUSED),
    ("TP does not divide heads", {"spec": {"resources": {"gpuCount": 4}}}, "must divide the attention heads"),
    (
        "context beyond model",
        {"spec": {"serving": {"maxModelLen": 65536}}},
        "exceeds architecture.maxPositionEmbeddings",
    ),
    (
        "heads not multiple of KV heads",
        {"spec": {"architecture": {**QWEN_05B, "numKeyValueHeads": 3}}},
        "multiple of numKeyValueHeads",
    ),
    ("name not a DNS-1035 label", {"metadata": {"name": "9lives"}}, "DNS-1035"),
    ("bad base model", {"spec": {"baseModel": "not a repo"}}, "spec.baseModel"),
]


@pytest.mark.parametrize("what,patch,message", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_model_is_rejected_by_the_api_server(crs, namespace, what, patch, message):
    body = model_body("bad", QWEN_05B)
    body["metadata"].update(patch.get("metadata", {}))
    for key, value in patch.get("spec", {}).items():
        body["spec"][key] = value
    with pytest.raises(ApiException) as err:
        create(crs, namespace, body)
    assert err.value.status == 422
    assert message in json.loads(err.value.body)["message"], err.value.body


def test_model_that_fits_nowhere_is_degraded_with_actionable_reasons(operator, crs, core, namespace):
    create(crs, namespace, model_body("qwen-14b-l4", QWEN_14B, serving={"maxModelLen": 32768},
                                      resources={"gpuProducts": ["NVIDIA-L4"], "gpuCount": 1}))
    obj = wait_condition(crs, namespace, "qwen-14b-l4", "Degraded", "True", "NoFit")
    capture("SmallModel", obj, "nofit")  # Argo CD: Degraded
    message = condition(obj, "Degraded")["message"]
    assert "needs" in message and "GiB" in message and "NVIDIA-L4" in message, message
    assert condition(obj, "Ready")["status"] == "False"
    assert "placement" not in obj["status"]
    assert not model_pods(core, namespace, "qwen-14b-l4")
    assert any(e.startswith("NoFit:") for e in events_for(core, namespace, "qwen-14b-l4"))


def _gpu_node(name: str, product: str, memory_mib: int, pool: str, taint: bool = False) -> dict:
    node = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "slmfleet.io/node-agent": "kwok",
            "slmfleet.io/pool": pool, "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.memory": str(memory_mib), "nvidia.com/gpu.count": "1", "nvidia.com/mig.strategy": "none"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {},
        "status": {"capacity": {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "1"},
                   "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "1"}},
    }
    if taint:
        node["spec"]["taints"] = [{"key": "slmfleet.io/test-reserved", "value": "yes", "effect": "NoSchedule"}]
    return node


@pytest.fixture
def extra_nodes(core):
    created = []

    def add(node: dict) -> None:
        core.create_node(node)
        created.append(node["metadata"]["name"])

    yield add
    for name in created:
        core.delete_node(name)


def test_new_gpu_node_places_a_model_that_did_not_fit(operator, crs, core, namespace, extra_nodes):
    pool = f"new-{uuid.uuid4().hex[:6]}"
    create(crs, namespace, model_body("waits-for-gpu", QWEN_05B, serving={"maxModelLen": 4096},
                                      resources={"nodeSelector": {"slmfleet.io/pool": pool}}))
    wait_condition(crs, namespace, "waits-for-gpu", "Degraded", "True", "NoFit")
    extra_nodes(_gpu_node(f"{pool}-0", "NVIDIA-L40S", 46068, pool))
    obj = wait_condition(crs, namespace, "waits-for-gpu", "Ready", "True", timeout=90)
    assert obj["status"]["placement"]["gpuProduct"] == "NVIDIA-L40S"


def test_pods_pending_too_long_move_to_the_next_fallback(operator, crs, core, namespace, extra_nodes):
    pool = f"pend-{uuid.uuid4().hex[:6]}"
    # Sizing prefers the smaller L4, but that node is tainted: its pods stay Pending. The model
    # comes first and the L4 before the L40S, so no reconcile can see the L40S alone (the
    # operator's node index may lag a node's creation).
    create(crs, namespace, model_body("falls-back", QWEN_05B, serving={"maxModelLen": 4096},
                                      resources={"nodeSelector": {"slmfleet.io/pool": pool}}))
    wait_condition(crs, namespace, "falls-back", "Degraded", "True", "NoFit")
    extra_nodes(_gpu_node(f"{pool}-l4", "NVIDIA-L4", 23034, pool, taint=True))
    wait_for(lambda: get(crs, namespace, "falls-back").get("status", {}).get("placement"), 60, what="placement")
    extra_nodes(_gpu_node(f"{pool}-l40s", "NVIDIA-L40S", 46068, pool))
    first = wait_for(lambda: get(crs, namespace, "falls-back").get("status", {}).get("placement"), 60, what="placement")
    assert first["gpuProduct"] == "NVIDIA-L4"
    capture("SmallModel", get(crs, namespace, "falls-back"), "pending")  # Argo CD: Progressing
    obj = wait_condition(crs, namespace, "falls-back", "Ready", "True", timeout=PENDING_TIMEOUT + 60)
    assert obj["status"]["placement"]["gpuProduct"] == "NVIDIA-L40S"
    excluded = obj["status"]["excludedPlacements"]
    assert excluded and "Pending" in excluded[0]["reason"] and "NVIDIA-L4" in excluded[0]["key"]
    assert any(e.startswith("PlacementFallback:") for e in events_for(core, namespace, "falls-back"))


def wait_no_writes_for(cluster, quiet: float, timeout: float = 60) -> None:
    """Until the audit log shows no write by the operator for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    seen, _ = audit_writes(cluster)
    last_change = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        lines, writes = audit_writes(cluster, since_line=seen)
        if writes:
            last_change = time.monotonic()
        seen = lines
        if time.monotonic() - last_change >= quiet:
            return
    raise AssertionError(f"the operator kept writing for {timeout}s")


def test_operator_restart_makes_no_writes_and_keeps_status(operator, crs, alone, cluster):
    # Counts the operator's writes across the whole cluster: `alone` waits until no other test's
    # model is still changing (a deleted namespace's models change state until they are gone).
    namespace = alone
    create(crs, namespace, model_body("steady", QWEN_05B, serving={"maxModelLen": 4096}))
    create(crs, namespace, model_body("steady-nofit", QWEN_14B, resources={"gpuProducts": ["NVIDIA-L4"], "gpuCount": 1},
                                      serving={"maxModelLen": 32768}))
    wait_condition(crs, namespace, "steady", "Ready", "True")
    wait_condition(crs, namespace, "steady-nofit", "Degraded", "True")
    wait_no_writes_for(cluster, 2.0)  # steady: the watch events of the operator's last writes came back
    before = {n: get(crs, namespace, n)["status"] for n in ("steady", "steady-nofit")}
    operator.stop()
    mark, _ = audit_writes(cluster)
    operator.start()
    # Every model in the cluster is reconciled after a restart; only ours are left.
    wait_for(lambda: operator.reconciles() >= 2, 60, what="reconciles after restart")
    time.sleep(3)
    _, writes = audit_writes(cluster, since_line=mark)
    assert writes == [], [f"{w['verb']} {w['requestURI']}" for w in writes]
    after = {n: get(crs, namespace, n)["status"] for n in ("steady", "steady-nofit")}
    assert after == before
    samples = operator.metrics()
    assert samples.get('slmfleet_api_writes_total{verb="apply"}', 0) == 0


def test_deleting_the_model_garbage_collects_what_it_owned(operator, crs, core, apps, namespace):
    create(crs, namespace, model_body("short-lived", QWEN_05B, serving={"maxModelLen": 4096}))
    wait_condition(crs, namespace, "short-lived", "Ready", "True")
    assert apps.list_namespaced_deployment(namespace).items
    crs.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "short-lived")
    wait_for(lambda: not apps.list_namespaced_deployment(namespace).items
             and not core.list_namespaced_service(namespace).items
             and not model_pods(core, namespace, "short-lived"), 90, what="owned objects garbage-collected")


def test_restricted_namespace_admits_the_operators_pods(operator, crs, core, namespace):
    core.patch_namespace(namespace, {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}})
    create(crs, namespace, model_body("restricted", QWEN_05B, serving={"maxModelLen": 4096}))
    wait_condition(crs, namespace, "restricted", "Ready", "True", "Serving")
    assert model_pods(core, namespace, "restricted")  # admission would have refused them otherwise


def test_operator_metrics_and_health(operator, crs, namespace):
    create(crs, namespace, model_body("measured", QWEN_05B, serving={"maxModelLen": 4096}))
    obj = wait_condition(crs, namespace, "measured", "Ready", "True")
    assert operator.healthy()

    product = obj["status"]["placement"]["gpuProduct"]
    wanted = {  # each met by this test's own model, whatever other tests did before
        f'slmfleet_gpus_requested{{product="{product}"}}': 1,
        'slmfleet_reconciles_total{kind="SmallModel",result="changed"}': 1,
        # the status write comes back as an event whose reconcile changes nothing
        'slmfleet_reconciles_total{kind="SmallModel",result="noop"}': 1,
        'slmfleet_reconcile_duration_seconds_count{kind="SmallModel"}': 2,
        'slmfleet_models{condition="Ready",status="True"}': 1,
    }

    def short() -> dict[str, float]:
        samples = operator.metrics()
        return {k: samples.get(k, 0) for k, least in wanted.items() if samples.get(k, 0) < least}

    wait_for(lambda: not short(), 30, what=f"metrics {wanted}")


def test_size_cli_reads_the_live_cluster(cluster, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "qwen2", "num_hidden_layers": 48, "hidden_size": 5120, "num_attention_heads": 40,
        "num_key_value_heads": 8, "vocab_size": 152064, "intermediate_size": 13824,
        "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}))
    slmfleet = str(Path(sys.executable).parent / "slmfleet")
    out = subprocess.run([slmfleet, "size", "--config", str(config), "--max-model-len", "32768", "--concurrency", "8",
                          "--kubeconfig", str(cluster.kubeconfig), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["kv_bytes_per_token"] == 2 * 48 * 8 * 128 * 2
    assert result["tensor_parallel_size"] in (1, 2, 4, 8) and result["gpu_count"] == result["tensor_parallel_size"]
    assert result["node_selector"] and result["gpu_resource"].startswith("nvidia.com/")
    assert result["total_bytes"] > result["weights_bytes"] > 25 * 2**30


def test_operator_watching_listed_namespaces_leaves_others_alone(operator, cluster, crs, core, namespace):
    other = f"{namespace[:50]}-other"
    core.create_namespace({"metadata": {"name": other}})
    operator.stop()
    scoped = OperatorProcess(cluster, metrics_port=operator.metrics_port + 1, pending_timeout=PENDING_TIMEOUT,
                             namespaces=(namespace,))
    try:
        scoped.start()
        create(crs, other, model_body("elsewhere", QWEN_05B, serving={"maxModelLen": 4096}))
        create(crs, namespace, model_body("watched", QWEN_05B, serving={"maxModelLen": 4096}))
        wait_condition(crs, namespace, "watched", "Ready", "True")  # nodes are still seen cluster-wide
        time.sleep(2)
        assert "status" not in get(crs, other, "elsewhere")
    finally:
        scoped.stop()
        delete_models(core.api_client, other)
        core.delete_namespace(other)
        operator.start()
