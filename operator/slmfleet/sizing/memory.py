"""How much device memory a model needs under vLLM: weights, KV cache and overhead.

vLLM's `--gpu-memory-utilization` is the fraction of a device's TOTAL memory vLLM may use for
everything: weights, the activation peak of its profiling run, CUDA graphs, runtime memory and the
KV cache, which gets whatever is left. With tensor parallel size T, weights and KV cache split over
the T devices (KV heads are replicated when T exceeds their number); overhead is paid per device.

Overhead model, per device and deliberately on the high side (an undersized pod crash-loops, an
oversized one only wastes a little memory):
- runtime: 768 MiB for the CUDA context, cuBLAS workspaces and allocator slack, plus 256 MiB of
  NCCL and all-reduce buffers when T > 1;
- activation peak: the profiling run pushes `max_num_batched_tokens` tokens through one layer at a
  time; about four live tensors of width (hidden + intermediate) at the model dtype, plus the
  sampler's float32 logits and probabilities (vocab × max_num_seqs × 4 bytes, twice);
- CUDA graphs: 128 MiB plus 2 MiB per captured batch size up to max_num_seqs, capped at 1 GiB.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from math import prod
from typing import Any

from slmfleet.sizing.architecture import ModelArchitecture, Quantization, SizingInputError
from slmfleet.sizing.parameters import ParameterCounts, parameter_counts

MIB = 2**20
GIB = 2**30

SERVING_DTYPES = ("auto", "bfloat16", "float16", "float32")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
QUANTIZATIONS = ("awq", "gptq", "fp8", "int8")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
}

RUNTIME_BYTES = 768 * MIB
TENSOR_PARALLEL_COMM_BYTES = 256 * MIB
ACTIVATION_COPIES = 4
LOGITS_COPIES = 2
CUDA_GRAPH_BASE_BYTES = 128 * MIB
CUDA_GRAPH_BYTES_PER_BATCH_SIZE = 2 * MIB
CUDA_GRAPH_CAP_BYTES = GIB
# What the operator passes as --max-num-batched-tokens: vLLM's chunked-prefill budget on large GPUs,
# kept fixed so that the overhead never depends on the device being considered.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


def serving_dtype(arch: ModelArchitecture, dtype: str = "auto") -> str:
    if dtype not in SERVING_DTYPES:
        raise SizingInputError(f"dtype {dtype!r} is not one of {', '.join(SERVING_DTYPES)}")
    if dtype != "auto":
        return dtype
    # Under "auto" vLLM serves float32 checkpoints in 16 bits.
    return arch.torch_dtype if arch.torch_dtype != "float32" else "bfloat16"


def effective_quantization(arch: ModelArchitecture, requested: str | None) -> Quantization | None:
    """The checkpoint's own format, or the one requested (online fp8/int8, or a what-if for AWQ/GPTQ)."""
    if requested is None:
        return arch.quantization
    if requested not in QUANTIZATIONS:
        raise SizingInputError(f"quantization {requested!r} is not one of {', '.join(QUANTIZATIONS)}")
    checkpoint = arch.quantization
    if checkpoint is not None:
        if checkpoint.method != requested:
            raise SizingInputError(
                f"the checkpoint is quantized as {checkpoint.method}; quantization {requested!r} does not apply"
            )
        return checkpoint
    if requested in ("awq", "gptq"):
        return Quantization(requested, bits=4, group_size=128, has_zero_point=True)
    return Quantization(requested, bits=8)


def kv_bytes_per_token(arch: ModelArchitecture, kv_cache_dtype: str = "auto", dtype: str = "auto") -> int:
    """K and V for every layer and KV head: 2 × layers × kv_heads × head_dim × bytes."""
    return 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * _kv_element_bytes(
        arch, kv_cache_dtype, dtype
    )


def weights_bytes(
    arch: ModelArchitecture,
    dtype: str = "auto",
    quantization: str | None = None,
    exact_param_bytes: int | None = None,
) -> int:
    """Bytes of weights vLLM loads.

    Exact checkpoint bytes (safetensors) win; they are rescaled only when serving changes the
    storage, e.g. a float32 checkpoint served in bfloat16 or a bf16 checkpoint quantized to fp8.
    """
    counts = parameter_counts(arch)
    served = _estimate(arch, counts, DTYPE_BYTES[serving_dtype(arch, dtype)], effective_quantization(arch, quantization))
    if exact_param_bytes is None:
        return served
    if exact_param_bytes <= 0:
        raise SizingInputError(f"exact weights bytes must be positive, not {exact_param_bytes}")
    stored = _estimate(arch, counts, DTYPE_BYTES[arch.torch_dtype], arch.quantization)
    if served == stored:
        return exact_param_bytes
    return -(-exact_param_bytes * served // stored)


def weights_bytes_from_safetensors_index(index: Mapping[str, Any]) -> int:
    """`metadata.total_size` of a `model.safetensors.index.json`."""
    total = (index.get("metadata") or {}).get("total_size") if isinstance(index, Mapping) else None
    if isinstance(total, str) and total.isdigit():
        total = int(total)
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        raise SizingInputError("safetensors index has no positive metadata.total_size")
    return total


def weights_bytes_from_safetensors_headers(headers: Iterable[Mapping[str, Any]]) -> int:
    """Sum of shape × element size over every tensor of every file's header."""
    total = 0
    for header in headers:
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            try:
                size = SAFETENSORS_DTYPE_BYTES[tensor["dtype"]]
                total += prod(int(d) for d in tensor["shape"]) * size
            except (KeyError, TypeError, ValueError) as exc:
                raise SizingInputError(f"safetensors tensor {name!r}: bad dtype or shape ({exc!r})") from exc
    if total <= 0:
        raise SizingInputError("safetensors headers describe no tensors")
    return total


@dataclass(frozen=True)
class Overhead:
    runtime_bytes: int
    activation_bytes: int
    logits_bytes: int
    cuda_graph_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.runtime_bytes + self.activation_bytes + self.logits_bytes + self.cuda_graph_bytes


def overhead_per_device(
    arch: ModelArchitecture,
    *,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    tensor_parallel_size: int,
    dtype_bytes: int,
) -> Overhead:
    width = arch.hidden_size + arch.intermediate_size
    return Overhead(
        runtime_bytes=RUNTIME_BYTES + (TENSOR_PARALLEL_COMM_BYTES if tensor_parallel_size > 1 else 0),
        activation_bytes=ACTIVATION_COPIES * max_num_batched_tokens * width * dtype_bytes,
        logits_bytes=LOGITS_COPIES * arch.vocab_size * max_num_seqs * 4,
        cuda_graph_bytes=min(CUDA_GRAPH_CAP_BYTES, CUDA_GRAPH_BASE_BYTES + CUDA_GRAPH_BYTES_PER_BATCH_SIZE * max_num_seqs),
    )


@dataclass(frozen=True)
class MemoryProfile:
    parameter_count: int
    weights_bytes: int
    weights_exact: bool
    kv_bytes_per_token: int
    kv_cache_bytes: int  # all devices, at max_model_len × max_num_seqs
    overhead_bytes: int  # per device
    total_bytes: int  # weights + KV cache + overhead on every device
    per_device_bytes: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    tensor_parallel_size: int
    dtype: str
    kv_cache_dtype: str
    quantization: str | None
    overhead: Overhead
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """e.g. 'needs 38.2 GiB (weights 15.0 + KV 21.5 at 32768 tokens × 8 sequences + 1.7 overhead)'."""
        where = "" if self.tensor_parallel_size == 1 else f" over {self.tensor_parallel_size} devices"
        return (
            f"needs {gib(self.total_bytes)} GiB{where} (weights {gib(self.weights_bytes)} + KV "
            f"{gib(self.kv_cache_bytes)} at {self.max_model_len} tokens × {self.max_num_seqs} sequences + "
            f"{gib(self.overhead_bytes * self.tensor_parallel_size)} overhead)"
        )

    def breakdown(self) -> dict[str, float]:
        """The figures in GiB, two decimals, for tables and status."""
        return {
            "weights": round(self.weights_bytes / GIB, 2),
            "kv_cache": round(self.kv_cache_bytes / GIB, 2),
            "overhead_per_device": round(self.overhead_bytes / GIB, 2),
            "total": round(self.total_bytes / GIB, 2),
            "per_device": round(self.per_device_bytes / GIB, 2),
        }

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["notes"] = list(self.notes)
        out["breakdown_gib"] = self.breakdown()
        return out


def memory_profile(
    arch: ModelArchitecture,
    *,
    max_model_len: int,
    max_num_seqs: int,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
    max_num_batched_tokens: int | None = None,
    exact_weights_bytes: int | None = None,
) -> MemoryProfile:
    if max_model_len < 1 or max_num_seqs < 1 or tensor_parallel_size < 1:
        raise SizingInputError("max_model_len, max_num_seqs and tensor_parallel_size must be positive")
    tp = tensor_parallel_size
    served = serving_dtype(arch, dtype)
    quant = effective_quantization(arch, quantization)
    weights = weights_bytes(arch, dtype, quantization, exact_weights_bytes)
    batched = max_num_batched_tokens or max(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_num_seqs)
    overhead = overhead_per_device(
        arch, max_num_seqs=max_num_seqs, max_num_batched_tokens=batched,
        tensor_parallel_size=tp, dtype_bytes=DTYPE_BYTES[served],
    )
    tokens = max_model_len * max_num_seqs
    kv_per_device = kv_bytes_per_token_per_device(arch, tp, kv_cache_dtype, dtype) * tokens
    return MemoryProfile(
        parameter_count=parameter_counts(arch).total,
        weights_bytes=weights,
        weights_exact=exact_weights_bytes is not None,
        kv_bytes_per_token=kv_bytes_per_token(arch, kv_cache_dtype, dtype),
        kv_cache_bytes=kv_per_device * tp,
        overhead_bytes=overhead.total_bytes,
        total_bytes=weights + kv_per_device * tp + overhead.total_bytes * tp,
        per_device_bytes=-(-weights // tp) + kv_per_device + overhead.total_bytes,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=batched,
        tensor_parallel_size=tp,
        dtype=served,
        kv_cache_dtype=kv_cache_dtype,
        quantization=quant.method if quant else None,
        overhead=overhead,
        notes=arch.notes,
    )


def kv_bytes_per_token_per_device(
    arch: ModelArchitecture, tensor_parallel_size: int, kv_cache_dtype: str = "auto", dtype: str = "auto"
) -> int:
    # With more devices than KV heads, vLLM gives every device a copy of one KV head.
    heads = max(1, -(-arch.num_key_value_heads // tensor_parallel_size))
    return 2 * arch.num_hidden_layers * heads * arch.head_dim * _kv_element_bytes(arch, kv_cache_dtype, dtype)


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _kv_element_bytes(arch: ModelArchitecture, kv_cache_dtype: str, dtype: str) -> int:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise SizingInputError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    return 1 if kv_cache_dtype.startswith("fp8") else DTYPE_BYTES[serving_dtype(arch, dtype)]


def _estimate(arch: ModelArchitecture, counts: ParameterCounts, dtype_bytes: int, quant: Quantization | None) -> int:
    if quant is None:
        return counts.total * dtype_bytes
    # vLLM keeps embeddings, LM head, norms, biases and any vision tower in 16 bits.
    kept = counts.unquantized * min(dtype_bytes, 2)
    packed = -(-counts.linear * quant.bits // 8)
    if quant.groupwise:
        groups = -(-counts.linear // quant.group_size)  # type: ignore[operator]
        zero_point_bytes = quant.bits / 8 if quant.has_zero_point else 0
        scales = int(groups * (2 + zero_point_bytes))
    else:
        scales = 4 * _linear_output_rows(arch)  # one float32 scale per output channel
    return kept + packed + scales


def _linear_output_rows(arch: ModelArchitecture) -> int:
    q_width = arch.num_attention_heads * arch.head_dim
    kv_width = arch.num_key_value_heads * arch.head_dim
    per_layer = q_width + 2 * kv_width + arch.hidden_size + 2 * arch.intermediate_size + arch.hidden_size
    return arch.num_hidden_layers * per_layer
