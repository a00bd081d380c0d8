import pytest

from slmfleet.sizing import (
    ModelArchitecture,
    SizingInputError,
    kv_bytes_per_token,
    memory_profile,
    parameter_count,
    weights_bytes,
    weights_bytes_from_safetensors_headers,
    weights_bytes_from_safetensors_index,
)
from slmfleet.sizing.memory import GIB
from tests.sizing_configs import (
    GEMMA_2_2B,
    LLAMA_3_1_8B,
    LLAMA_3_1_8B_AWQ,
    MISTRAL_7B_V0_1,
    QWEN2_5_0_5B,
    QWEN3_4B,
)

LLAMA = ModelArchitecture.from_hf_config(LLAMA_3_1_8B)


@pytest.mark.parametrize("config, vllm_gib", [
    (LLAMA_3_1_8B, 14.99),
    (QWEN2_5_0_5B, 0.93),
    (MISTRAL_7B_V0_1, 13.5),
    (LLAMA_3_1_8B_AWQ, 5.4),
], ids=["llama-3.1-8b", "qwen2.5-0.5b", "mistral-7b", "llama-3.1-8b-awq"])
def test_weights_are_within_five_percent_of_what_vllm_reports_loading(config, vllm_gib):
    arch = ModelArchitecture.from_hf_config(config)
    assert weights_bytes(arch) / GIB == pytest.approx(vllm_gib, rel=0.05)


def test_weights_bytes_per_dtype_and_quantization():
    params = parameter_count(LLAMA)
    assert weights_bytes(LLAMA, "bfloat16") == weights_bytes(LLAMA, "float16") == 2 * params
    assert weights_bytes(LLAMA, "float32") == 4 * params
    fp8 = weights_bytes(LLAMA, quantization="fp8")
    int8 = weights_bytes(LLAMA, quantization="int8")
    awq = weights_bytes(LLAMA, quantization="awq")
    embeddings_16bit = 2 * 2 * 128256 * 4096  # embedding and LM head stay 16-bit
    assert embeddings_16bit < awq < int8 == fp8 < 2 * params
    assert fp8 == pytest.approx(params + 2 * 128256 * 4096, rel=0.01)


def test_a_float32_checkpoint_is_served_in_16_bits():
    gemma = ModelArchitecture.from_hf_config(GEMMA_2_2B)
    assert weights_bytes(gemma) == 2 * parameter_count(gemma)
    exact_fp32 = 4 * parameter_count(gemma)
    assert weights_bytes(gemma, exact_param_bytes=exact_fp32) == exact_fp32 // 2


def test_exact_bytes_win_unless_serving_changes_the_storage():
    assert weights_bytes(LLAMA, exact_param_bytes=16_060_522_496) == 16_060_522_496
    online_fp8 = weights_bytes(LLAMA, quantization="fp8", exact_param_bytes=16_060_522_496)
    assert online_fp8 == pytest.approx(weights_bytes(LLAMA, quantization="fp8"), rel=1e-6)


def test_a_quantization_that_contradicts_the_checkpoint_is_refused():
    awq = ModelArchitecture.from_hf_config(LLAMA_3_1_8B_AWQ)
    assert weights_bytes(awq, quantization="awq") == weights_bytes(awq)
    with pytest.raises(SizingInputError, match="quantized as awq"):
        weights_bytes(awq, quantization="gptq")


def test_kv_bytes_per_token_is_exact():
    assert kv_bytes_per_token(LLAMA) == 2 * 32 * 8 * 128 * 2 == 131072
    assert kv_bytes_per_token(LLAMA, "fp8") == kv_bytes_per_token(LLAMA, "fp8_e5m2") == 65536
    qwen3 = ModelArchitecture.from_hf_config(QWEN3_4B)
    assert kv_bytes_per_token(qwen3) == 2 * 36 * 8 * 128 * 2
    with pytest.raises(SizingInputError, match="kv_cache_dtype"):
        kv_bytes_per_token(LLAMA, "int4")


def test_safetensors_index_total_size():
    index = {"metadata": {"total_size": 16060522496}, "weight_map": {"lm_head.weight": "model-00004-of-00004.safetensors"}}
    assert weights_bytes_from_safetensors_index(index) == 16060522496
    with pytest.raises(SizingInputError, match="total_size"):
        weights_bytes_from_safetensors_index({"weight_map": {}})


def test_safetensors_headers_sum_shape_times_element_size():
    headers = [
        {"__metadata__": {"format": "pt"},
         "model.embed_tokens.weight": {"dtype": "BF16", "shape": [151936, 896], "data_offsets": [0, 272269312]},
         "model.norm.weight": {"dtype": "F32", "shape": [896], "data_offsets": [272269312, 272272896]}},
        {"model.layers.0.mlp.down_proj.qweight": {"dtype": "I32", "shape": [608, 896], "data_offsets": [0, 2179072]},
         "model.layers.0.mlp.down_proj.weight_scale": {"dtype": "F8_E4M3", "shape": [], "data_offsets": [0, 1]}},
    ]
    assert weights_bytes_from_safetensors_headers(headers) == 151936 * 896 * 2 + 896 * 4 + 608 * 896 * 4 + 1
    with pytest.raises(SizingInputError, match="bad dtype"):
        weights_bytes_from_safetensors_headers([{"x": {"dtype": "Q4", "shape": [1]}}])


def test_memory_profile_adds_up_and_splits_over_tensor_parallel_devices():
    one = memory_profile(LLAMA, max_model_len=32768, max_num_seqs=8)
    assert one.kv_cache_bytes == 131072 * 32768 * 8 == 32 * GIB
    assert one.total_bytes == one.weights_bytes + one.kv_cache_bytes + one.overhead_bytes == one.per_device_bytes
    assert 1.5 * GIB < one.overhead_bytes < 3 * GIB
    two = memory_profile(LLAMA, max_model_len=32768, max_num_seqs=8, tensor_parallel_size=2)
    assert two.per_device_bytes == -(-two.weights_bytes // 2) + two.kv_cache_bytes // 2 + two.overhead_bytes
    assert two.overhead_bytes > one.overhead_bytes  # NCCL buffers
    text = one.describe()
    assert text.startswith("needs 49.") and "weights 15.0 + KV 32.0 at 32768 tokens × 8 sequences" in text
    assert one.breakdown()["kv_cache"] == 32.0
    assert one.to_dict()["overhead"]["runtime_bytes"] > 0


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    qwen = ModelArchitecture.from_hf_config(QWEN2_5_0_5B)  # 2 KV heads
    four = memory_profile(qwen, max_model_len=1024, max_num_seqs=1, tensor_parallel_size=14)
    assert four.kv_cache_bytes == 14 * (2 * 24 * 1 * 64 * 2) * 1024


def test_overhead_grows_with_batch_and_sequences_but_caps_cuda_graphs():
    small = memory_profile(LLAMA, max_model_len=4096, max_num_seqs=1, max_num_batched_tokens=2048)
    big = memory_profile(LLAMA, max_model_len=4096, max_num_seqs=1024, max_num_batched_tokens=8192)
    assert big.overhead.activation_bytes == 4 * small.overhead.activation_bytes
    assert big.overhead.logits_bytes == 1024 * small.overhead.logits_bytes
    assert big.overhead.cuda_graph_bytes == GIB
