"""CPU placements: sizing on nodes without GPUs, the pod that follows, and the model plan around it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmfleet.api.config import OperatorConfig
from slmfleet.api.smallmodel import Placement as ApiPlacement
from slmfleet.api.smallmodel import SmallModelSpec
from slmfleet.builders import ModelOwner, build_deployment
from slmfleet.planning.placement import to_api_placement
from slmfleet.sizing import ModelArchitecture, SizingRequest, inventory_from_nodes, plan_placement
from slmfleet.sizing.cpu import (
    BF16_PRODUCT,
    CPU_RUNTIME_BYTES,
    PLAIN_PRODUCT,
    CpuSizing,
    quantity,
)
from slmfleet.sizing.memory import GIB, MIB
from slmfleet.sizing.pools import ready_nodes_from_pools_doc
from tests.sizing_configs import QWEN2_5_0_5B, QWEN2_5_14B
from tests.sizing_nodes import gpu_node
from tests.test_builders import restricted_violations

# SmolLM2-135M-Instruct's config.json, as e2e/real_vllm/smollm2.py writes it (transformers 5 says "dtype").
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "head_dim": 64,
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "dtype": "bfloat16",
}
BF16_CPUID = {"feature.node.kubernetes.io/cpu-cpuid.AVX512BF16": "true",
              "feature.node.kubernetes.io/cpu-cpuid.AVX512F": "true"}
AVX2_CPUID = {"feature.node.kubernetes.io/cpu-cpuid.AVX2": "true"}
CPU_IMAGE = "registry.internal:5000/vllm/vllm-cpu:v0.32.0@sha256:" + "7" * 64
CONFIG = OperatorConfig.model_validate({"vllmImage": "vllm/vllm-openai:v0.32.0@sha256:" + "5" * 64,
                                        "loaderImage": "slmfleet/slmfleet:0.1.0@sha256:" + "c" * 64,
                                        "cpuVllmImage": CPU_IMAGE})


def cpu_node(name: str, cores: str, memory: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {},
        "status": {"allocatable": {"cpu": cores, "memory": memory, "pods": "110"},
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def pod_on(node: str, cpu: str, memory: str, *, phase: str = "Running") -> dict[str, Any]:
    resources = {"requests": {"cpu": cpu, "memory": memory}}
    return {"metadata": {"name": f"p-{node}", "uid": f"u-{node}-{cpu}-{memory}"},
            "spec": {"nodeName": node, "containers": [{"name": "app", "resources": resources}]},
            "status": {"phase": phase}}


def request(config: dict[str, Any] = SMOLLM2_135M, **fields: Any) -> SizingRequest:
    return SizingRequest(architecture=ModelArchitecture.from_hf_config(config), **fields)


FLEET = [cpu_node("bf16-0", "2", "8Gi", BF16_CPUID), cpu_node("avx2-0", "32", "128Gi", AVX2_CPUID),
         gpu_node("l4-0", "NVIDIA-L4", 23034, 1)]


# --- sizing ------------------------------------------------------------------------------------


def test_a_cpu_model_lands_on_the_bf16_node_with_its_memory_spelled_out():
    result = plan_placement(request(accelerator="cpu"), inventory_from_nodes(FLEET, []))
    p = result.placement
    assert p is not None and p.accelerator == "cpu"
    assert (p.gpu_resource, p.gpu_product, p.gpu_count, p.dtype) == ("cpu", BF16_PRODUCT, 2, "bfloat16")
    assert p.node_selector == {"feature.node.kubernetes.io/cpu-cpuid.AVX512BF16": "true"}
    # 2 × 30 layers × 3 KV heads × 64 × 2 bytes = 23,040 bytes a token; 8192 tokens × 8 sequences = 1.41 GiB -> 2 GiB.
    assert result.profile.kv_bytes_per_token == 23_040
    assert (p.max_model_len, p.max_num_seqs, p.kv_cache_gib) == (8192, 8, 2)
    need = result.profile.weights_bytes + 2 * GIB + result.profile.overhead_bytes
    assert p.memory_bytes == -(-need // (256 * MIB)) * 256 * MIB
    assert result.profile.overhead.runtime_bytes == CPU_RUNTIME_BYTES
    assert p.memory_bytes <= 8 * GIB
    assert any("VLLM_CPU_KVCACHE_SPACE" in r for r in result.reasons)
    # The other class is the fallback: float32 on any CPU node, twice the weights.
    [fallback] = result.fallbacks
    assert (fallback.gpu_product, fallback.dtype, fallback.gpu_count) == (PLAIN_PRODUCT, "float32", 4)
    assert fallback.memory_bytes > p.memory_bytes


def test_gpu_is_the_default_and_never_lands_on_a_cpu_node():
    result = plan_placement(request(QWEN2_5_14B), inventory_from_nodes([FLEET[0], FLEET[1]], []))
    assert result.placement is None
    assert "CPU" not in result.message


def test_auto_prefers_a_gpu_and_keeps_the_cpu_as_the_last_fallback():
    result = plan_placement(request(QWEN2_5_0_5B, accelerator="auto"), inventory_from_nodes(FLEET, []))
    assert result.placement is not None and result.placement.accelerator == "gpu"
    assert [f.accelerator for f in result.fallbacks][-1] == "cpu"


def test_auto_falls_back_to_a_cpu_when_no_gpu_fits_and_says_why():
    busy = [FLEET[0], FLEET[1], gpu_node("l4-0", "NVIDIA-L4", 23034, 0)]
    result = plan_placement(request(QWEN2_5_0_5B, accelerator="auto"), inventory_from_nodes(busy, []))
    assert result.placement is not None and result.placement.accelerator == "cpu"
    assert result.reasons[0].startswith("no GPU placement fits: ")


def test_free_memory_is_allocatable_less_what_pods_request_there():
    # 6 GiB taken on the bf16 node: the 2 GiB KV cache no longer fits, a 1 GiB one does.
    inventory = inventory_from_nodes(FLEET[:1], [pod_on("bf16-0", "100m", "2Gi")])
    [bf16] = [n for n in inventory.cpu_nodes if n.node_name == "bf16-0"]
    assert (bf16.free_memory, bf16.free_millicores) == (6 * GIB, 1900)
    result = plan_placement(request(accelerator="cpu", cpu_cores=1), inventory)
    p = result.placement
    assert p is not None and p.gpu_product == BF16_PRODUCT
    assert p.kv_cache_gib == 1 and p.max_model_len < 8192 and p.memory_bytes <= 6 * GIB
    # A finished pod holds nothing.
    done = inventory_from_nodes(FLEET, [pod_on("bf16-0", "2", "8Gi", phase="Succeeded")])
    assert next(n for n in done.cpu_nodes if n.node_name == "bf16-0").free_memory == 8 * GIB


def test_cores_that_no_node_has_free_leave_only_the_bigger_nodes():
    result = plan_placement(request(accelerator="cpu", cpu_cores=8), inventory_from_nodes(FLEET, []))
    assert result.placement is not None
    assert (result.placement.gpu_product, result.placement.gpu_count) == (PLAIN_PRODUCT, 8)
    assert result.fallbacks == ()


@pytest.mark.parametrize("fields, says", [
    ({"dtype": "bfloat16"}, "AVX512-BF16"),
    ({"quantization": "fp8"}, "quantized checkpoints are served on GPUs only"),
    ({"kv_cache_dtype": "fp8"}, "kvCacheDtype fp8 is served on GPUs only"),
    ({"dtype": "float16"}, "float16 has no native path on CPUs"),
    ({"node_selector": {"pool": "nope"}}, "matches no CPU node"),
])
def test_a_cpu_model_that_cannot_be_placed_says_why(fields, says):
    result = plan_placement(request(accelerator="cpu", **fields), inventory_from_nodes([FLEET[1]], []))
    assert result.placement is None
    assert says in result.message


def test_a_model_too_big_for_any_cpu_node_names_its_need_and_the_most_free():
    small = [cpu_node("small", "4", "4Gi", BF16_CPUID)]
    result = plan_placement(request(accelerator="cpu"), inventory_from_nodes(small, []))
    assert result.placement is None
    assert "the most free on a CPU node is 4.0 GiB" in result.message and "runtime" in result.message


def test_float32_checkpoints_stay_float32_on_cpus():
    f32 = {**SMOLLM2_135M, "dtype": "float32"}
    result = plan_placement(request(f32, accelerator="cpu"), inventory_from_nodes(FLEET, []))
    assert result.placement is not None and result.placement.dtype == "float32"


def test_the_longest_context_is_the_whole_gib_kv_cache_that_fits():
    sizing = CpuSizing(ModelArchitecture.from_hf_config(SMOLLM2_135M), "bfloat16", 8)
    assert sizing.longest_context(5 * GIB) == 0  # 4.4 GiB of weights and runtime leave no whole GiB
    for free in (6 * GIB, 6 * GIB + 100 * MIB, 8 * GIB, 20 * GIB):
        context = sizing.longest_context(free)
        assert context > 0 and sizing.memory(context) <= free
        assert sizing.memory(context + 1024) > free or sizing.kv_gib(context + 1024) == sizing.kv_gib(context)


@pytest.mark.parametrize("text, value", [("8Gi", 8 * GIB), ("512Mi", 512 * MIB), ("1G", 10**9), ("2", 2),
                                         ("1500m", 1), ("junk", 0), (None, 0)])
def test_quantities(text, value):
    assert quantity(text) == value


# --- the pod -----------------------------------------------------------------------------------


def cpu_api_placement() -> ApiPlacement:
    result = plan_placement(request(accelerator="cpu"), inventory_from_nodes(FLEET, []))
    assert result.placement is not None
    return to_api_placement(result.placement, result.profile, result.reasons)


def cpu_deployment() -> dict[str, Any]:
    spec = SmallModelSpec.model_validate({"source": {"uri": "pvc://models/smollm2", "digest": "sha256:" + "a" * 64},
                                          "resources": {"accelerator": "cpu"}})
    owner = ModelOwner(name="smollm2", namespace="models", uid="6f1c2c5e-3b7a-4a55-9a8e-0d6a2f1b9c11")
    return build_deployment(owner, spec, cpu_api_placement(), "0123456789", CONFIG, hardened=True)


def test_the_status_placement_reads_as_a_cpu_placement():
    p = cpu_api_placement()
    assert (p.accelerator, p.summary, p.kv_cache_gib, p.dtype) == ("cpu", "CPU-BF16 2 cores", 2, "bfloat16")
    assert p.key == "cpu|CPU-BF16|2"


def test_the_cpu_pod_runs_the_cpu_image_guaranteed_off_gpu_nodes():
    pod = cpu_deployment()["spec"]["template"]["spec"]
    [vllm] = pod["containers"]
    assert vllm["image"] == CPU_IMAGE
    placement = cpu_api_placement()
    limits = {"cpu": "2", "memory": str(placement.memory_bytes)}
    assert vllm["resources"] == {"requests": limits, "limits": limits}
    env = {e["name"]: e["value"] for e in vllm["env"]}
    assert (env["VLLM_CPU_KVCACHE_SPACE"], env["VLLM_CPU_OMP_THREADS_BIND"], env["OMP_NUM_THREADS"]) == ("2", "auto", "2")
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    args = vllm["args"]
    assert args[args.index("--dtype") + 1] == "bfloat16"
    assert args[args.index("--max-model-len") + 1] == "8192"
    [term] = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "nvidia.com/gpu.product", "operator": "DoesNotExist"} in term["matchExpressions"]
    assert {"key": "feature.node.kubernetes.io/cpu-cpuid.AVX512BF16", "operator": "In",
            "values": ["true"]} in term["matchExpressions"]
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])  # /dev/shm
    assert restricted_violations(pod) == []


def test_nobind_for_kubelets_without_the_static_cpu_manager():
    config = CONFIG.model_copy(update={"cpu_thread_binding": "nobind"})
    spec = SmallModelSpec.model_validate({"source": {"uri": "pvc://models/smollm2", "digest": "sha256:" + "a" * 64}})
    owner = ModelOwner(name="smollm2", namespace="models", uid="6f1c2c5e-3b7a-4a55-9a8e-0d6a2f1b9c11")
    [vllm] = build_deployment(owner, spec, cpu_api_placement(), "0123456789", config)["spec"]["template"]["spec"][
        "containers"]
    assert {e["name"]: e["value"] for e in vllm["env"]}["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


# --- pools and the CLI ---------------------------------------------------------------------------

POOLS = {"pools": [
    {"name": "cpu-bf16", "nodes": 1, "cpu": 2, "memory": "8Gi", "cpuid": ["AVX512BF16", "AVX512F", "AMXBF16"]},
    {"name": "l4", "nodes": 1, "cpu": 8, "memory": "32Gi",
     "gpu": {"product": "NVIDIA-L4", "memoryMiB": 23034, "count": 1, "family": "ada-lovelace",
             "computeMajor": 8, "computeMinor": 9}},
]}


def test_pools_label_cpu_features_as_node_feature_discovery_does():
    [cpu, _] = ready_nodes_from_pools_doc(POOLS)
    labels = cpu["metadata"]["labels"]
    for feature in ("AVX512BF16", "AVX512F", "AMXBF16"):
        assert labels[f"feature.node.kubernetes.io/cpu-cpuid.{feature}"] == "true"


def test_slmfleet_size_shows_a_cpu_placement(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    import yaml
    (tmp_path / "pools.yaml").write_text(yaml.safe_dump(POOLS))
    out = subprocess.run([sys.executable, "-m", "slmfleet.cli.main", "size", "--config", str(tmp_path), "--pools",
                          str(tmp_path / "pools.yaml"), "--accelerator", "cpu"], capture_output=True, text=True,
                         check=True).stdout
    assert "vLLM CPU backend, 2 cores of CPU-BF16" in out
    assert "2 GiB (VLLM_CPU_KVCACHE_SPACE)" in out and "bfloat16" in out
    as_json = json.loads(subprocess.run(
        [sys.executable, "-m", "slmfleet.cli.main", "size", "--config", str(tmp_path), "--pools", str(tmp_path / "pools.yaml"),
         "--accelerator", "cpu", "--json"], capture_output=True, text=True, check=True).stdout)
    assert (as_json["accelerator"], as_json["kv_cache_gib"], as_json["dtype"]) == ("cpu", 2, "bfloat16")


# --- the model plan ------------------------------------------------------------------------------

def world(resources: dict[str, Any], config: OperatorConfig = CONFIG, nodes: list[dict[str, Any]] | None = None):
    from tests.test_model_plan import World, model_body
    return World(model_body(hf_config=SMOLLM2_135M, resources=resources), FLEET if nodes is None else nodes, config)


def test_a_cpu_model_is_placed_and_served_by_the_cpu_image():
    w = world({"accelerator": "cpu"})
    w.settle()
    placement = w.status["placement"]
    assert (placement["accelerator"], placement["summary"], placement["kvCacheGib"]) == ("cpu", "CPU-BF16 2 cores", 2)
    [vllm] = w.deployment()["spec"]["template"]["spec"]["containers"]
    assert vllm["image"] == CPU_IMAGE
    assert w.condition("Degraded")["status"] == "False"


def test_a_cpu_model_without_a_cpu_image_is_degraded_and_gets_no_deployment():
    from tests.test_model_plan import CONFIG as GPU_ONLY
    w = world({"accelerator": "cpu"}, GPU_ONLY)
    w.reconcile()
    degraded = w.condition("Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "NoCpuImage")
    assert "cpuVllmImage" in degraded["message"]
    assert not any(kind == "Deployment" for kind, _ in w.kinds_and_names())


def test_auto_without_a_cpu_image_sizes_for_gpus_only():
    from tests.test_model_plan import CONFIG as GPU_ONLY
    w = world({"accelerator": "auto"}, GPU_ONLY, nodes=[FLEET[0], FLEET[1]])
    w.reconcile()
    degraded = w.condition("Degraded")
    assert degraded["reason"] == "NoFit" and "CPU" not in degraded["message"]
    w_cpu = world({"accelerator": "auto"}, CONFIG, nodes=[FLEET[0], FLEET[1]])
    w_cpu.settle()
    assert w_cpu.status["placement"]["accelerator"] == "cpu"


# --- a vLLM that fails to start ------------------------------------------------------------------

# The tail of the real vLLM 0.32's output when started with `--enable-auto-tool-choice --tool-call-parser
# nonexistent` (exit 1), shortened; the termination message (FallbackToLogsOnError) holds such a tail.
REAL_FAILURE = """\
(APIServer pid=1) INFO 11-30 16:30:01 [utils.py:233] non-default args: {'model_tag': '/models/m'}
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/vllm/entrypoints/launchers/launcher.py", line 362, in validate_api_server_args
    raise KeyError(
KeyError: 'invalid tool call parser: nonexistent (chose from { apertus,hermes,llama3_json })'
"""


def test_the_error_line_is_vllms_own_without_noise():
    from slmfleet.planning.status import vllm_error_line

    assert vllm_error_line(REAL_FAILURE) == ("KeyError: 'invalid tool call parser: nonexistent (chose from "
                                             "{ apertus,hermes,llama3_json })'")
    argparse_failure = "usage: vllm serve [-h] ...\nvllm serve: error: argument --dtype: invalid choice: 'int3'\n"
    assert vllm_error_line(argparse_failure) == "vllm serve: error: argument --dtype: invalid choice: 'int3'"
    engine = "(EngineCore pid=42) \x1b[31mERROR\x1b[0m 11-30 [core.py:1] EngineCore failed to start.\nbye\n"
    assert vllm_error_line(engine) == "ERROR 11-30 [core.py:1] EngineCore failed to start."
    assert vllm_error_line("x" * 5000 + "Error: " + "y" * 5000).endswith("…")
    assert len(vllm_error_line("ValueError: " + "z" * 5000)) == 400
    assert vllm_error_line("") == ""


def test_a_vllm_that_keeps_exiting_degrades_the_model_with_its_error_line():
    w = world({"accelerator": "cpu"})
    w.settle()
    revision = w.status["revision"]
    w.pods.append({
        "metadata": {"name": "smollm2-x", "uid": "u1", "labels": {"slmfleet.io/model": "qwen-chat",
                                                                   "slmfleet.io/revision": revision}},
        "spec": {"nodeName": "bf16-0", "containers": [{"name": "vllm", "resources": {}}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "vllm", "ready": False, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": REAL_FAILURE}}}]}})
    w.reconcile()
    degraded = w.condition("Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "VllmStartFailed")
    assert degraded["message"].startswith("pod smollm2-x: vLLM exited with code 1: KeyError: 'invalid tool call parser")


# --- properties ----------------------------------------------------------------------------------

@st.composite
def cpu_fleets(draw):
    nodes, pods = [], []
    for i in range(draw(st.integers(1, 5))):
        labels = draw(st.sampled_from([BF16_CPUID, AVX2_CPUID, {}]))
        cores, memory_gib = draw(st.sampled_from([1, 2, 4, 8, 32])), draw(st.sampled_from([4, 6, 8, 16, 64, 256]))
        nodes.append(cpu_node(f"c-{i}", str(cores), f"{memory_gib}Gi", labels))
        if draw(st.booleans()):
            pods.append(pod_on(f"c-{i}", f"{draw(st.integers(0, cores * 1000))}m", f"{draw(st.integers(0, memory_gib))}Gi"))
    return nodes, pods


@settings(max_examples=150, deadline=None)
@given(cpu_fleets(), st.sampled_from(["auto", "bfloat16", "float32"]), st.integers(1, 16),
       st.none() | st.sampled_from([512, 2048, 8192]), st.none() | st.integers(1, 8),
       st.sampled_from([SMOLLM2_135M, QWEN2_5_0_5B, {**SMOLLM2_135M, "dtype": "float32"}]))
def test_cpu_placements_fit_their_node_and_hold_their_kv_cache(fleet, dtype, concurrency, max_len, cores, config):
    inventory = inventory_from_nodes(*fleet)
    req = request(config, accelerator="cpu", dtype=dtype, concurrency=concurrency, cpu_cores=cores,
                  max_model_len=None if max_len is None else min(max_len, config["max_position_embeddings"]))
    result = plan_placement(req, inventory)
    for p in filter(None, (result.placement, *result.fallbacks)):
        assert p.accelerator == "cpu" and p.tensor_parallel_size == 1
        assert cores in (None, p.gpu_count)
        hosts = [n for n in inventory.cpu_nodes if all(n.labels.get(k) == v for k, v in p.node_selector.items())
                 and n.free_millicores >= p.gpu_count * 1000 and n.free_memory >= p.memory_bytes]
        assert len(hosts) == p.nodes_with_capacity >= 1
        assert p.dtype in ("bfloat16", "float32")
        assert p.dtype == "float32" or all(n.bf16 for n in hosts)
        assert dtype == "auto" or p.dtype == dtype
        sizing = CpuSizing(req.architecture, p.dtype, concurrency)
        assert p.kv_cache_gib * GIB >= sizing.kv_per_token * p.max_model_len * concurrency  # the context fits its cache
        assert p.memory_bytes >= sizing.weights + p.kv_cache_gib * GIB + CPU_RUNTIME_BYTES
        assert req.context_floor <= p.max_model_len <= req.context_goal
    if result.placement is None:
        assert result.message.startswith("CPU: ")


def test_another_models_cpu_pod_holds_its_nodes_memory():
    # The operator's index keeps every model pod, GPU or not (controller/registry.py): here another
    # model's vLLM holds 2 GiB and a core of the only bf16 node (8 GiB, 2 cores), so this model gets the
    # core and the 1 GiB cache that are left.
    w = world({"accelerator": "cpu"}, nodes=FLEET[:1])
    other = pod_on("bf16-0", "1", "2Gi")
    other["metadata"]["labels"] = {"slmfleet.io/model": "another"}
    w.other_pods.append(other)
    w.settle()
    placement = w.status["placement"]
    assert placement["kvCacheGib"] == 1 and placement["maxModelLen"] < 8192 and placement["gpuCount"] == 1
    assert placement["memoryBytes"] <= 6 * GIB


def test_the_pod_index_keeps_gpu_pods_and_model_pods_only():
    from slmfleet.controller.registry import pod_entries

    def kept(labels: dict, resources: dict, phase: str = "Running") -> bool:
        body = {"metadata": {"name": "p", "uid": "u", "labels": labels}, "status": {"phase": phase},
                "spec": {"containers": [{"name": "c", "resources": resources}]}}
        [key] = [key for store, _, key, _ in pod_entries(body) if store == "slm_gpu_pods"]
        return key is not None
    assert kept({}, {"limits": {"nvidia.com/gpu": "1"}})
    assert kept({"slmfleet.io/model": "m"}, {"requests": {"cpu": "2", "memory": "6Gi"}})
    assert not kept({}, {"requests": {"cpu": "2", "memory": "6Gi"}})  # another workload: the scheduler's
    assert not kept({"slmfleet.io/model": "m"}, {}, phase="Succeeded")
