import random
import re

import pytest

from slmfleet.sizing import (
    Inventory,
    ModelArchitecture,
    SizingInputError,
    SizingRequest,
    inventory_from_nodes,
    plan_placement,
)
from slmfleet.sizing.fit import tensor_parallel_problem
from tests.sizing_configs import LLAMA_3_1_8B, LLAMA_3_1_8B_AWQ, QWEN2_5_0_5B, QWEN2_5_14B
from tests.sizing_nodes import default_fleet, gpu_node, gpu_pod

QWEN_05 = ModelArchitecture.from_hf_config(QWEN2_5_0_5B)
QWEN_14 = ModelArchitecture.from_hf_config(QWEN2_5_14B)
LLAMA = ModelArchitecture.from_hf_config(LLAMA_3_1_8B)
H100 = "NVIDIA-H100-80GB-HBM3"


@pytest.fixture(scope="module")
def fleet():
    return inventory_from_nodes(default_fleet(), [])


def test_a_small_model_gets_a_mig_slice_not_a_whole_h100(fleet):
    result = plan_placement(SizingRequest(QWEN_05), fleet)
    p = result.placement
    assert p is not None and p.is_mig
    assert p.gpu_resource == "nvidia.com/mig-2g.10gb" and p.gpu_product == "NVIDIA-A100-SXM4-40GB-MIG-2g.10gb"
    assert (p.gpu_count, p.tensor_parallel_size, p.max_model_len, p.max_num_seqs) == (1, 1, 32768, 8)
    assert p.node_selector == {"nvidia.com/mig-2g.10gb.product": "NVIDIA-A100-SXM4-40GB-MIG-2g.10gb"}
    assert p.nodes_with_capacity == 2 and p.key == "nvidia.com/mig-2g.10gb|NVIDIA-A100-SXM4-40GB-MIG-2g.10gb|1"
    assert [f.gpu_product for f in result.fallbacks] == [
        "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb", "NVIDIA-L4", "NVIDIA-A100-SXM4-40GB", H100,
    ]
    assert result.message == ""
    assert any("smallest free device" in r for r in result.reasons)
    assert any("1g.5gb" in r and "holds only" in r for r in result.reasons)


def test_without_mig_a_small_model_gets_an_l4(fleet):
    p = plan_placement(SizingRequest(QWEN_05, allow_mig=False), fleet).placement
    assert p is not None and p.gpu_product == "NVIDIA-L4" and p.node_selector == {"nvidia.com/gpu.product": "NVIDIA-L4"}


def test_a_14b_model_with_long_context_needs_tensor_parallelism_or_an_h100(fleet):
    result = plan_placement(SizingRequest(QWEN_14, max_model_len=32768), fleet)
    p = result.placement
    assert p is not None and (p.tensor_parallel_size >= 2 or p.gpu_product == H100)
    assert p.max_model_len == 32768
    assert not any(f.gpu_product.endswith(("MIG-1g.5gb", "MIG-2g.10gb")) or f.gpu_product == "NVIDIA-L4"
                   for f in result.fallbacks)


def test_an_exact_gpu_count_is_respected(fleet):
    result = plan_placement(SizingRequest(LLAMA, gpu_count=2), fleet)
    assert result.placement is not None
    assert {result.placement.gpu_count, *(f.gpu_count for f in result.fallbacks)} == {2}
    assert result.placement.tensor_parallel_size == 2 and not result.placement.is_mig


def test_allowed_products_are_respected(fleet):
    result = plan_placement(SizingRequest(QWEN_05, allowed_products=("NVIDIA-L4", H100)), fleet)
    assert result.placement is not None and result.placement.gpu_product == "NVIDIA-L4"
    assert [f.gpu_product for f in result.fallbacks] == [H100]
    by_resource = plan_placement(SizingRequest(QWEN_05, allowed_products=("nvidia.com/mig-3g.20gb",)), fleet)
    assert by_resource.placement is not None and by_resource.placement.gpu_resource == "nvidia.com/mig-3g.20gb"


def test_a_flexible_context_shrinks_to_fit_and_says_so(fleet):
    result = plan_placement(SizingRequest(LLAMA, allowed_products=("NVIDIA-L4",)), fleet)
    p = result.placement
    assert p is not None and 2048 <= p.max_model_len < 32768 and p.max_model_len % 1024 == 0
    assert any("shortened from 32768" in r for r in result.reasons)
    assert result.profile.max_model_len == p.max_model_len


def test_goal_context_is_preferred_over_fewer_devices(fleet):
    # One A100 holds Llama-8B only with a shorter context; two hold the full 32768.
    p = plan_placement(SizingRequest(LLAMA, allowed_products=("NVIDIA-A100-SXM4-40GB",)), fleet).placement
    assert p is not None and (p.gpu_count, p.max_model_len) == (2, 32768)


def test_utilization_covers_the_need_without_exceeding_the_cap(fleet):
    for request in (SizingRequest(QWEN_05), SizingRequest(QWEN_14), SizingRequest(LLAMA, max_gpu_memory_utilization=0.8)):
        result = plan_placement(request, fleet)
        for p in (result.placement, *result.fallbacks):
            need = result.profile.per_device_bytes if p is result.placement else None
            assert p.gpu_memory_utilization <= request.max_gpu_memory_utilization
            assert p.gpu_memory_utilization >= min(0.9, request.max_gpu_memory_utilization)
            if need is not None:
                assert need <= p.device_memory_bytes * p.gpu_memory_utilization


def test_excluded_placements_move_to_the_next_device(fleet):
    first = plan_placement(SizingRequest(QWEN_05), fleet)
    second = plan_placement(SizingRequest(QWEN_05, excluded=frozenset({first.placement.key})), fleet)
    assert second.placement == first.fallbacks[0]
    assert any("stayed Pending" in r for r in second.reasons)


def test_every_fitting_placement_excluded_is_reported():
    inv = inventory_from_nodes([gpu_node("l-0", "NVIDIA-L4", 23034, 1)], [])
    first = plan_placement(SizingRequest(QWEN_05), inv)
    result = plan_placement(SizingRequest(QWEN_05, excluded=frozenset({first.placement.key})), inv)
    assert result.placement is None and "stayed Pending" in result.message and first.placement.key in result.message


def test_node_selector_limits_the_nodes(fleet):
    p = plan_placement(SizingRequest(QWEN_05, node_selector={"slmfleet.io/pool": "process-l4"}), fleet).placement
    assert p is not None and p.gpu_product == "NVIDIA-L4" and p.nodes_with_capacity == 2
    assert p.node_selector == {"slmfleet.io/pool": "process-l4", "nvidia.com/gpu.product": "NVIDIA-L4"}


def test_tensor_parallel_must_fit_on_one_node():
    # Eight L4s, but one per node: no TP=2 for a model that needs two.
    inv = inventory_from_nodes([gpu_node(f"l-{i}", "NVIDIA-L4", 23034, 1) for i in range(8)], [])
    result = plan_placement(SizingRequest(QWEN_14, max_model_len=8192), inv)
    assert result.placement is None


def test_busy_devices_are_not_offered():
    inv = inventory_from_nodes([gpu_node("h-0", H100, 81559, 2)], [gpu_pod("h-0", 2, uid="x")])
    result = plan_placement(SizingRequest(QWEN_05), inv)
    assert result.placement is None
    assert "no free GPUs" in result.message and "once they free up" in result.message


def test_full_mig_slices_are_not_offered_and_the_next_device_is_chosen():
    nodes = default_fleet()
    mig = [n for n in nodes if "nvidia.com/mig-2g.10gb" in n["status"]["allocatable"]]
    taken = [gpu_pod(n["metadata"]["name"], int(n["status"]["allocatable"]["nvidia.com/mig-2g.10gb"]), uid=f"x{i}",
                     resource="nvidia.com/mig-2g.10gb") for i, n in enumerate(mig)]
    result = plan_placement(SizingRequest(QWEN_05), inventory_from_nodes(nodes, taken))
    assert result.placement is not None
    assert result.placement.gpu_product == "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb"  # the next one, with free slices
    assert "NVIDIA-A100-SXM4-40GB-MIG-2g.10gb" not in [f.gpu_product for f in result.fallbacks]


def test_no_fit_message_says_what_is_needed_and_what_would_fit():
    inv = inventory_from_nodes([gpu_node(f"l-{i}", "NVIDIA-L4", 23034, 2) for i in range(2)], [])
    result = plan_placement(SizingRequest(LLAMA, max_model_len=32768), inv)
    assert result.placement is None
    message = result.message
    assert message.startswith("needs 49.")
    assert re.search(r"weights 15\.0 \+ KV 32\.0 at 32768 tokens × 8 sequences \+ \d+\.\d overhead", message)
    assert "largest free GPU NVIDIA-L4 gives 21.4 GiB at 0.95" in message
    assert re.search(r"fits with max context \d+", message)
    assert "on 4× NVIDIA-L4 with TP=4 (no node has 4 free now)" not in message  # 2 per node: TP=4 impossible
    assert result.profile.max_model_len == 32768 and result.profile.kv_cache_bytes == 32 * 2**30
    two = plan_placement(SizingRequest(LLAMA, max_model_len=16384), inv)
    assert two.placement is not None and two.placement.tensor_parallel_size == 2


def test_no_fit_suggests_tensor_parallelism_when_a_node_has_the_devices():
    inv = inventory_from_nodes([gpu_node("l-0", "NVIDIA-L4", 23034, 4)], [gpu_pod("l-0", 3, uid="x")])
    message = plan_placement(SizingRequest(LLAMA, max_model_len=16384), inv).message
    assert "on 2× NVIDIA-L4 with TP=2 (no node has 2 free now)" in message


def test_no_fit_names_the_blocking_constraint(fleet):
    products = plan_placement(SizingRequest(QWEN_14, allowed_products=("NVIDIA-B200",)), fleet).message
    assert "allowed products NVIDIA-B200 match none" in products and "without that constraint" in products
    selector = plan_placement(SizingRequest(QWEN_05, node_selector={"pool": "nope"}), fleet).message
    assert "node selector pool=nope matches no GPU node" in selector
    heads = plan_placement(SizingRequest(LLAMA, gpu_count=3), fleet).message
    assert "exact gpu count 3 is not a usable tensor parallel size: 32 attention heads are not divisible by TP=3" in heads
    mig_only = inventory_from_nodes([n for n in default_fleet() if n["metadata"]["name"].startswith("a100-40gb-mig")], [])
    no_mig = plan_placement(SizingRequest(QWEN_05, allow_mig=False), mig_only).message
    assert "MIG slices are not allowed" in no_mig
    too_big = plan_placement(SizingRequest(QWEN_14, max_model_len=8192), mig_only).message
    assert "the weights alone (27.5 GiB) exceed it" in too_big


def test_an_empty_inventory_still_gives_the_memory_figures():
    result = plan_placement(SizingRequest(QWEN_14), Inventory())
    assert result.placement is None and result.fallbacks == ()
    assert result.profile.weights_bytes > 27 * 2**30 and result.profile.kv_bytes_per_token == 196608
    assert "no schedulable GPU nodes" in result.message and result.message.startswith("needs ")


def test_mig_slices_never_take_tensor_parallelism(fleet):
    result = plan_placement(SizingRequest(QWEN_05, gpu_count=2), fleet)
    assert result.placement is not None and not result.placement.is_mig
    assert not any(f.is_mig for f in result.fallbacks)


def test_tensor_parallel_rule_follows_vllm():
    qwen = QWEN_05  # 14 heads, 2 KV heads, intermediate 4864
    assert tensor_parallel_problem(qwen, 2) is None
    assert "not divisible" in tensor_parallel_problem(qwen, 4)
    assert "neither divides" in tensor_parallel_problem(qwen, 7)
    assert "intermediate size 4864" in tensor_parallel_problem(qwen, 14)
    awq = ModelArchitecture.from_hf_config(LLAMA_3_1_8B_AWQ)  # 14336 / 8 = 1792 = 14 groups of 128
    assert tensor_parallel_problem(awq, 8) is None


def test_results_are_deterministic(fleet):
    nodes = default_fleet()
    random.Random(7).shuffle(nodes)
    shuffled = inventory_from_nodes(nodes, [])
    for request in (SizingRequest(QWEN_05), SizingRequest(QWEN_14, max_model_len=32768), SizingRequest(LLAMA, gpu_count=3)):
        assert plan_placement(request, fleet) == plan_placement(request, shuffled)
        assert plan_placement(request, fleet).to_dict() == plan_placement(request, fleet).to_dict()


def test_to_dict_is_flat_and_null_when_nothing_fits(fleet):
    placed = plan_placement(SizingRequest(QWEN_05), fleet).to_dict()
    assert placed["gpu_resource"] == "nvidia.com/mig-2g.10gb" and placed["tensor_parallel_size"] == 1
    assert placed["kv_bytes_per_token"] == 12288 and isinstance(placed["fallbacks"], list)
    missing = plan_placement(SizingRequest(QWEN_05), Inventory()).to_dict()
    assert missing["gpu_resource"] is None and missing["node_selector"] is None and missing["placement"] is None
    assert missing["weights_bytes"] > 0 and missing["message"]


@pytest.mark.parametrize("kwargs, error", [
    ({"dtype": "int8"}, "dtype"),
    ({"quantization": "nf4"}, "quantization"),
    ({"kv_cache_dtype": "int8"}, "kv_cache_dtype"),
    ({"concurrency": 0}, "concurrency"),
    ({"gpu_count": 0}, "gpu_count"),
    ({"max_gpu_memory_utilization": 1.5}, "max_gpu_memory_utilization"),
    ({"max_model_len": 65536}, "outside 1..32768"),
    ({"replicas": 0}, "replicas"),
])
def test_bad_requests_are_refused(kwargs, error):
    with pytest.raises(SizingInputError, match=error):
        SizingRequest(QWEN_05, **kwargs)


def _all_but_one_free(nodes, resource):
    """Pods taking every `resource` device of `nodes` but one."""
    holders = [n for n in nodes if resource in n["status"]["allocatable"]]
    pods = [gpu_pod(n["metadata"]["name"], int(n["status"]["allocatable"][resource]), uid=f"x{i}", resource=resource)
            for i, n in enumerate(holders)]
    pods[0] = gpu_pod(holders[0]["metadata"]["name"], int(holders[0]["status"]["allocatable"][resource]) - 1,
                      uid="x0", resource=resource)
    return pods


def test_a_class_with_room_for_every_replica_ranks_before_a_smaller_one_with_room_for_one():
    nodes = default_fleet()
    inv = inventory_from_nodes(nodes, _all_but_one_free(nodes, "nvidia.com/mig-2g.10gb"))
    one = plan_placement(SizingRequest(QWEN_05), inv).placement
    assert one is not None and one.gpu_resource == "nvidia.com/mig-2g.10gb" and one.pods_with_room == 1

    result = plan_placement(SizingRequest(QWEN_05, replicas=2), inv)
    two = result.placement
    assert two is not None and two.gpu_resource != "nvidia.com/mig-2g.10gb" and two.pods_with_room >= 2
    assert two.gpu_product == "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb"  # the next smallest, as with one replica
    assert any("hold all 2 replicas" in r for r in result.reasons)


def test_with_no_class_holding_every_replica_the_best_one_is_chosen_and_the_reasons_say_so():
    inv = inventory_from_nodes([gpu_node("l-0", "NVIDIA-L4", 23034, 2)], [gpu_pod("l-0", 1, uid="x")])
    result = plan_placement(SizingRequest(QWEN_05, replicas=3), inv)
    assert result.placement is not None and result.placement.gpu_product == "NVIDIA-L4"
    assert result.placement.pods_with_room == 1 and result.to_dict()["pods_with_room"] == 1
    assert any("hold 1 of the 3 replicas" in r and "Pending" in r for r in result.reasons)


def test_tensor_parallel_pods_count_whole_groups_of_free_devices():
    inv = inventory_from_nodes([gpu_node("l-0", "NVIDIA-L4", 23034, 4), gpu_node("l-1", "NVIDIA-L4", 23034, 3)], [])
    placement = plan_placement(SizingRequest(QWEN_05, gpu_count=2), inv).placement
    assert placement is not None and placement.pods_with_room == 3  # 2 on l-0, 1 on l-1 (its third device alone holds none)
