"""Exact parameter counts of decoder-only transformers, split by how vLLM stores them.

Quantized checkpoints shrink only the linear layers of the decoder; embeddings, the LM head,
norms, biases and the vision tower stay 16-bit. Keeping those groups apart lets the memory model
price each one correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmfleet.sizing.architecture import ModelArchitecture, VisionTower


@dataclass(frozen=True)
class ParameterCounts:
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    linear: int  # q, k, v, o, gate, up, down of every layer: the weights quantization applies to
    other: int  # norms and biases
    vision: int  # vision encoder and projector, if any

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.linear + self.other + self.vision

    @property
    def unquantized(self) -> int:
        return self.total - self.linear


def parameter_counts(arch: ModelArchitecture) -> ParameterCounts:
    h, layers = arch.hidden_size, arch.num_hidden_layers
    q_width = arch.num_attention_heads * arch.head_dim
    kv_width = arch.num_key_value_heads * arch.head_dim
    attention = h * q_width + 2 * h * kv_width + q_width * h
    mlp = 3 * h * arch.intermediate_size
    biases = (q_width + 2 * kv_width if arch.qkv_bias else 0) + (h if arch.o_bias else 0)
    biases += 2 * arch.intermediate_size + h if arch.mlp_bias else 0
    norms = arch.norms_per_layer * h + (2 * arch.head_dim if arch.qk_norm else 0)
    embedding = arch.vocab_size * h
    return ParameterCounts(
        embedding=embedding,
        lm_head=0 if arch.tie_word_embeddings else embedding,
        linear=layers * (attention + mlp),
        other=layers * (biases + norms) + h,  # + the final norm
        vision=_vision(arch.vision) if arch.vision else 0,
    )


def parameter_count(arch: ModelArchitecture) -> int:
    return parameter_counts(arch).total


def _vision(v: VisionTower) -> int:
    d = v.hidden_size
    patches = (v.image_size // v.patch_size) ** 2
    patch_embedding = v.num_channels * v.patch_size**2 * d + d
    position_embedding = patches * d
    attention = 4 * (d * d + d)
    mlp = 2 * d * v.intermediate_size + v.intermediate_size + d
    layer_norms = 2 * 2 * d  # two LayerNorms with weight and bias
    encoder = v.num_hidden_layers * (attention + mlp + layer_norms)
    post_norm = 2 * d
    projector = d * v.projector_out + d  # projection and its RMSNorm on the vision side
    return patch_embedding + position_embedding + encoder + post_norm + projector
