"""Properties of placement over random models and fleets."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from slmfleet.sizing import ModelArchitecture, SizingRequest, inventory_from_nodes, plan_placement
from slmfleet.sizing.fit import tensor_parallel_problem
from tests.sizing_nodes import gpu_node, gpu_pod

PRODUCTS = [("NVIDIA-T4", 15360), ("NVIDIA-L4", 23034), ("NVIDIA-A10", 24564), ("NVIDIA-A100-SXM4-40GB", 40960),
            ("NVIDIA-H100-80GB-HBM3", 81559), ("NVIDIA-H200", 143771)]
MIG = [("1g.5gb", 4864), ("2g.10gb", 9856), ("3g.20gb", 19968)]
FAST = settings(max_examples=150, deadline=None)


@st.composite
def architectures(draw):
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3, 4, 7, 8]))
    head_dim = draw(st.sampled_from([64, 128, 256]))
    return ModelArchitecture.from_hf_config({
        "model_type": draw(st.sampled_from(["llama", "qwen2", "qwen3", "gemma2", "phi3", "mistral"])),
        "num_hidden_layers": draw(st.integers(1, 64)),
        "hidden_size": heads * head_dim,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": 128 * draw(st.integers(1, 160)),
        "vocab_size": draw(st.integers(1000, 260_000)),
        "max_position_embeddings": draw(st.sampled_from([2048, 4096, 8192, 32768, 131072])),
        "tie_word_embeddings": draw(st.booleans()),
        "torch_dtype": "bfloat16",
    })


@st.composite
def requests(draw):
    arch = draw(architectures())
    fixed_len = draw(st.none() | st.sampled_from([512, 2048, 4096, 8192, 32768]))
    return SizingRequest(
        arch,
        max_model_len=None if fixed_len is None else min(fixed_len, arch.max_position_embeddings),
        concurrency=draw(st.integers(1, 64)),
        gpu_count=draw(st.none() | st.sampled_from([1, 2, 4, 8])),
        kv_cache_dtype=draw(st.sampled_from(["auto", "fp8"])),
        quantization=draw(st.sampled_from([None, None, "fp8", "awq"])),
        max_gpu_memory_utilization=draw(st.sampled_from([0.8, 0.9, 0.95])),
    )


def mig_node(name: str, slices: dict[str, int]) -> dict:
    node = gpu_node(name, "NVIDIA-A100-SXM4-40GB", 40960, 8)
    node["status"]["allocatable"]["nvidia.com/gpu"] = "0"
    for profile, memory in MIG:
        node["metadata"]["labels"][f"nvidia.com/mig-{profile}.memory"] = str(memory)
        node["metadata"]["labels"][f"nvidia.com/mig-{profile}.product"] = f"NVIDIA-A100-SXM4-40GB-MIG-{profile}"
        node["status"]["allocatable"][f"nvidia.com/mig-{profile}"] = str(slices.get(profile, 0))
    return node


@st.composite
def fleets(draw):
    nodes, pods = [], []
    for i in range(draw(st.integers(0, 6))):
        name = f"n-{i}"
        if draw(st.integers(0, 4)) == 0:
            nodes.append(mig_node(name, {p: draw(st.integers(0, 8)) for p, _ in MIG}))
            continue
        product, memory = draw(st.sampled_from(PRODUCTS))
        count = draw(st.sampled_from([1, 2, 4, 8]))
        nodes.append(gpu_node(name, product, memory, count))
        used = draw(st.integers(0, count))
        if used:
            pods.append(gpu_pod(name, used, uid=name))
    return nodes, pods


def check_placement(request, result, inventory):
    arch = request.architecture
    for p in filter(None, (result.placement, *result.fallbacks)):
        assert p.gpu_count == p.tensor_parallel_size
        assert p.device_memory_bytes * p.gpu_memory_utilization <= p.device_memory_bytes
        assert p.gpu_memory_utilization <= request.max_gpu_memory_utilization
        assert arch.num_attention_heads % p.tensor_parallel_size == 0
        kv = arch.num_key_value_heads
        assert kv % p.tensor_parallel_size == 0 or p.tensor_parallel_size % kv == 0
        assert tensor_parallel_problem(arch, p.tensor_parallel_size, request.quantization) is None
        assert not (p.is_mig and p.tensor_parallel_size > 1)
        assert request.gpu_count in (None, p.gpu_count)
        assert p.max_model_len <= arch.max_position_embeddings
        on_one_node = [n for n in inventory.nodes if n.device.resource == p.gpu_resource
                       and n.device.product == p.gpu_product and n.free >= p.gpu_count]
        assert len(on_one_node) == p.nodes_with_capacity >= 1
    if result.placement:
        p = result.placement
        assert result.profile.per_device_bytes * 100 <= p.device_memory_bytes * round(p.gpu_memory_utilization * 100)
        assert result.profile.max_model_len == p.max_model_len


@FAST
@given(requests(), fleets())
def test_placements_never_exceed_device_memory_and_respect_vllm_rules(request, fleet):
    inventory = inventory_from_nodes(*fleet)
    check_placement(request, plan_placement(request, inventory), inventory)


@FAST
@given(requests(), fleets(), st.sampled_from(PRODUCTS), st.sampled_from([1, 2, 4, 8]))
def test_more_devices_never_make_a_placeable_model_unplaceable(request, fleet, extra, count):
    nodes, pods = fleet
    before = plan_placement(request, inventory_from_nodes(nodes, pods))
    more = [*nodes, gpu_node("extra", extra[0], extra[1], count)]
    after = plan_placement(request, inventory_from_nodes(more, pods))
    if before.placement is not None:
        assert after.placement is not None


@FAST
@given(requests(), fleets(), st.data())
def test_more_memory_per_device_never_makes_a_placeable_model_unplaceable(request, fleet, data):
    nodes, pods = fleet
    before = plan_placement(request, inventory_from_nodes(nodes, pods))
    whole = [n for n in nodes if n["status"]["allocatable"]["nvidia.com/gpu"] != "0"]
    if before.placement is None or not whole:
        return
    bigger = data.draw(st.sampled_from(whole))
    labels = bigger["metadata"]["labels"]
    labels["nvidia.com/gpu.memory"] = str(int(labels["nvidia.com/gpu.memory"]) * data.draw(st.sampled_from([1, 2, 4])))
    after = plan_placement(request, inventory_from_nodes(nodes, pods))
    assert after.placement is not None


@FAST
@given(requests(), fleets(), st.randoms(use_true_random=False))
def test_results_are_deterministic_whatever_the_node_order(request, fleet, rng: random.Random):
    nodes, pods = fleet
    first = plan_placement(request, inventory_from_nodes(nodes, pods))
    assert plan_placement(request, inventory_from_nodes(nodes, pods)) == first
    shuffled_nodes, shuffled_pods = list(nodes), list(pods)
    rng.shuffle(shuffled_nodes)
    rng.shuffle(shuffled_pods)
    assert plan_placement(request, inventory_from_nodes(shuffled_nodes, shuffled_pods)) == first


@FAST
@given(requests(), fleets())
def test_nothing_placed_always_comes_with_an_actionable_message(request, fleet):
    result = plan_placement(request, inventory_from_nodes(*fleet))
    if result.placement is None:
        assert result.message.startswith("needs ") and "GiB" in result.message
        assert result.fallbacks == ()
    else:
        assert result.message == "" and result.reasons
