"""Per-device memory need of one model configuration, and the rules for tensor parallelism.

Placement asks the same questions many times (does it fit at this context on this device with
this TP? how long a context would fit?), so the model-dependent parts are computed once here and
answered with integer arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slmfleet.sizing.architecture import ModelArchitecture
from slmfleet.sizing.memory import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DTYPE_BYTES,
    MemoryProfile,
    effective_quantization,
    kv_bytes_per_token_per_device,
    memory_profile,
    overhead_per_device,
    serving_dtype,
    weights_bytes,
)


@dataclass(frozen=True)
class ModelFit:
    arch: ModelArchitecture
    max_num_seqs: int
    dtype: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    exact_weights_bytes: int | None = None
    weights: int = field(init=False)
    max_num_batched_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", weights_bytes(self.arch, self.dtype, self.quantization, self.exact_weights_bytes))
        object.__setattr__(self, "max_num_batched_tokens", max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_num_seqs))

    def need(self, tp: int, context: int, seqs: int | None = None) -> int:
        """Bytes one of `tp` devices must hold at `context` tokens × `seqs` sequences."""
        seqs = self.max_num_seqs if seqs is None else seqs
        return self._fixed(tp, seqs) + self._kv_per_token(tp) * context * seqs

    def max_context(self, tp: int, budget: int) -> int:
        """The longest context (tokens) that fits `budget` bytes per device; 0 when none does."""
        room = budget - self._fixed(tp, self.max_num_seqs)
        return max(0, room // (self._kv_per_token(tp) * self.max_num_seqs))

    def max_seqs(self, tp: int, context: int, budget: int) -> int:
        """The most sequences of `context` tokens that fit `budget` bytes per device."""
        seqs = self.max_num_seqs
        while seqs > 0 and self.need(tp, context, seqs) > budget:
            seqs -= 1  # overhead shrinks with seqs too, so step down rather than divide
        return seqs

    def profile(self, tp: int, context: int) -> MemoryProfile:
        return memory_profile(
            self.arch,
            max_model_len=context,
            max_num_seqs=self.max_num_seqs,
            tensor_parallel_size=tp,
            dtype=self.dtype,
            quantization=self.quantization,
            kv_cache_dtype=self.kv_cache_dtype,
            max_num_batched_tokens=self.max_num_batched_tokens,
            exact_weights_bytes=self.exact_weights_bytes,
        )

    def _fixed(self, tp: int, seqs: int) -> int:
        overhead = overhead_per_device(
            self.arch,
            max_num_seqs=seqs,
            max_num_batched_tokens=max(DEFAULT_MAX_NUM_BATCHED_TOKENS, seqs),
            tensor_parallel_size=tp,
            dtype_bytes=DTYPE_BYTES[serving_dtype(self.arch, self.dtype)],
        )
        return -(-self.weights // tp) + overhead.total_bytes

    def _kv_per_token(self, tp: int) -> int:
        return kv_bytes_per_token_per_device(self.arch, tp, self.kv_cache_dtype, self.dtype)


def tensor_parallel_problem(arch: ModelArchitecture, tp: int, quantization: str | None = None) -> str | None:
    """Why vLLM would refuse tensor parallel size `tp` for this model, or None when it accepts it.

    vLLM splits attention heads evenly (heads % tp == 0), splits KV heads or replicates them
    (kv_heads % tp == 0 or tp % kv_heads == 0), and splits the MLP's intermediate dimension,
    which group-quantized weights must split on group boundaries.
    """
    heads, kv_heads = arch.num_attention_heads, arch.num_key_value_heads
    if heads % tp:
        return f"{heads} attention heads are not divisible by TP={tp}"
    if kv_heads % tp and tp % kv_heads:
        return f"{kv_heads} KV heads and TP={tp}: neither divides the other"
    if arch.intermediate_size % tp:
        return f"intermediate size {arch.intermediate_size} is not divisible by TP={tp}"
    quant = effective_quantization(arch, quantization)
    if quant is not None and quant.groupwise and (arch.intermediate_size // tp) % quant.group_size:  # type: ignore[operator]
        return (f"intermediate size {arch.intermediate_size} / TP={tp} is not a multiple of the quantization group "
                f"{quant.group_size}")
    return None


CONTEXT_STEP = 1_024  # shortened contexts are rounded down to this...
SHORT_CONTEXT_STEP = 256  # ...or to this below it (vLLM's blocks are 16 tokens; these read better)


def round_context(tokens: int) -> int:
    step = CONTEXT_STEP if tokens >= CONTEXT_STEP else SHORT_CONTEXT_STEP
    return tokens // step * step


def budget_bytes(device_memory_bytes: int, utilization_hundredths: int) -> int:
    return device_memory_bytes * utilization_hundredths // 100
