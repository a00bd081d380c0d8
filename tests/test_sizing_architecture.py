import pytest

from slmfleet.sizing import ModelArchitecture, SizingInputError, parameter_count, parameter_counts
from tests.sizing_configs import (
    GEMMA_2_2B,
    GEMMA_3_1B,
    GEMMA_3_4B,
    LLAMA_3_1_8B,
    LLAMA_3_1_8B_AWQ,
    MISTRAL_7B_V0_1,
    PHI_3_MINI_4K,
    QWEN2_5_0_5B,
    QWEN2_5_14B,
    QWEN3_4B,
)


@pytest.mark.parametrize("config, published", [
    (QWEN2_5_0_5B, 494_032_768),
    (LLAMA_3_1_8B, 8_030_261_248),
    (MISTRAL_7B_V0_1, 7_241_732_096),
    (GEMMA_2_2B, 2_614_341_888),
    (GEMMA_3_1B, 999_885_952),
    (GEMMA_3_4B, 4_300_079_472),  # text model + SigLIP vision tower + projector
    (PHI_3_MINI_4K, 3_821_079_552),
    (LLAMA_3_1_8B_AWQ, 8_030_261_248),  # quantization changes bytes, not parameters
], ids=["qwen2.5-0.5b", "llama-3.1-8b", "mistral-7b", "gemma-2-2b", "gemma-3-1b", "gemma-3-4b", "phi-3-mini", "awq"])
def test_parameter_counts_match_the_published_totals_exactly(config, published):
    assert parameter_count(ModelArchitecture.from_hf_config(config)) == published


@pytest.mark.parametrize("config, published", [(QWEN3_4B, 4.02e9), (QWEN2_5_14B, 14.77e9)], ids=["qwen3-4b", "qwen2.5-14b"])
def test_parameter_counts_match_rounded_published_totals(config, published):
    assert parameter_count(ModelArchitecture.from_hf_config(config)) == pytest.approx(published, rel=0.005)


def test_family_extras_are_resolved_into_plain_fields():
    qwen2 = ModelArchitecture.from_hf_config(QWEN2_5_0_5B)
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.norms_per_layer, qwen2.qk_norm) == (True, False, 2, False)
    assert qwen2.head_dim == 64 and qwen2.tie_word_embeddings
    qwen3 = ModelArchitecture.from_hf_config(QWEN3_4B)
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 128)
    gemma2 = ModelArchitecture.from_hf_config(GEMMA_2_2B)
    assert gemma2.tie_word_embeddings and gemma2.norms_per_layer == 4 and gemma2.torch_dtype == "float32"
    gemma3 = ModelArchitecture.from_hf_config(GEMMA_3_4B)
    assert (gemma3.num_attention_heads, gemma3.num_key_value_heads, gemma3.head_dim) == (8, 4, 256)
    assert gemma3.vocab_size == 262_208 and gemma3.max_position_embeddings == 131_072
    assert gemma3.vision is not None and gemma3.vision.projector_out == 2560
    llama = ModelArchitecture.from_hf_config(LLAMA_3_1_8B)
    assert not llama.tie_word_embeddings and llama.notes == ()


def test_tied_embeddings_are_counted_once():
    tied = parameter_counts(ModelArchitecture.from_hf_config(QWEN2_5_0_5B))
    untied = parameter_counts(ModelArchitecture.from_hf_config({**QWEN2_5_0_5B, "tie_word_embeddings": False}))
    assert tied.lm_head == 0
    assert untied.total - tied.total == 151936 * 896


def test_newer_dtype_key_and_explicit_head_dim_are_read():
    arch = ModelArchitecture.from_hf_config({**MISTRAL_7B_V0_1, "dtype": "float16", "torch_dtype": None, "head_dim": 96})
    assert arch.torch_dtype == "float16" and arch.head_dim == 96


def test_unknown_family_falls_back_to_the_llama_formula_and_says_so():
    arch = ModelArchitecture.from_hf_config({**LLAMA_3_1_8B, "model_type": "granite"})
    assert parameter_count(arch) == 8_030_261_248
    assert any("granite" in n and "Llama formula" in n for n in arch.notes)


def test_quantization_configs_are_normalized():
    awq = ModelArchitecture.from_hf_config(LLAMA_3_1_8B_AWQ).quantization
    assert awq is not None and (awq.method, awq.bits, awq.group_size, awq.has_zero_point) == ("awq", 4, 128, True)
    gptq = ModelArchitecture.from_hf_config(
        {**LLAMA_3_1_8B, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}}
    ).quantization
    assert gptq is not None and gptq.method == "gptq"
    fp8 = ModelArchitecture.from_hf_config(
        {**LLAMA_3_1_8B, "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    ).quantization
    assert fp8 is not None and (fp8.method, fp8.bits, fp8.group_size) == ("fp8", 8, None)
    w4a16 = ModelArchitecture.from_hf_config({**LLAMA_3_1_8B, "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True}}},
    }}).quantization
    assert w4a16 is not None and (w4a16.method, w4a16.bits, w4a16.group_size) == ("int4", 4, 128)
    unknown = ModelArchitecture.from_hf_config({**LLAMA_3_1_8B, "quantization_config": {"quant_method": "hqq"}})
    assert unknown.quantization is None and any("hqq" in n for n in unknown.notes)


@pytest.mark.parametrize("config, error", [
    ({}, "model_type"),
    ({**LLAMA_3_1_8B, "num_hidden_layers": None}, "num_hidden_layers"),
    ({**LLAMA_3_1_8B, "hidden_size": "4096"}, "hidden_size must be a positive integer"),
    ({**LLAMA_3_1_8B, "num_key_value_heads": 5}, "not a multiple of num_key_value_heads"),
    ({**LLAMA_3_1_8B, "hidden_size": 4097}, "not a multiple of num_attention_heads"),
    ({**LLAMA_3_1_8B, "torch_dtype": "int8"}, "not one of"),
    ({**LLAMA_3_1_8B, "max_position_embeddings": None}, "max_position_embeddings"),
    ({**GEMMA_3_4B, "text_config": [1]}, "text_config must be an object"),
])
def test_bad_configs_are_rejected_with_a_clear_message(config, error):
    with pytest.raises(SizingInputError, match=error):
        ModelArchitecture.from_hf_config(config)


def test_sizing_input_error_is_a_value_error():
    assert issubclass(SizingInputError, ValueError)
