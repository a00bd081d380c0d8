"""The `vllm serve` command line of a revision.

Only flags that vLLM's own parser accepts (vLLM >= 0.10; tests check them against the stand-in,
which declares vLLM's flags with their names and choices). The image's ENTRYPOINT is
`vllm serve`, so these are the container's `args`, starting with the positional model path.
"""

from __future__ import annotations

from slmfleet.api.smallmodel import Placement, Quantization, Serving

# The API names quantizations by what the checkpoint is; vLLM names them by the loader that reads
# them. W8A8 int8 checkpoints (llm-compressor) are in compressed-tensors format.
VLLM_QUANTIZATION: dict[Quantization, str] = {
    "awq": "awq",
    "gptq": "gptq",
    "fp8": "fp8",
    "int8": "compressed-tensors",
}

# vLLM's default host already means every interface; being explicit keeps the pod reachable even
# if that default changes.
LISTEN_HOST = "0.0.0.0"


def vllm_serve_args(
    model_path: str,
    served_model_name: str,
    placement: Placement,
    serving: Serving,
    port: int,
) -> list[str]:
    """Arguments after `vllm serve`: the model path, the flags the operator manages, then extraArgs."""
    args = [
        model_path,
        # Before the managed flags: argparse keeps the last value of a flag, and vLLM's parser
        # accepts abbreviations (--tensor-parallel=4), which no CEL rule can list exhaustively;
        # so whatever extraArgs say, the placement's flags win.
        *serving.extra_args,
        "--served-model-name", served_model_name,
        "--host", LISTEN_HOST,
        "--port", str(port),
        "--tensor-parallel-size", str(placement.tensor_parallel_size),
        "--gpu-memory-utilization", placement.gpu_memory_utilization,
        "--max-model-len", str(placement.max_model_len),
        "--max-num-seqs", str(placement.max_num_seqs),
        # A CPU placement decides the dtype from the node's CPU (bfloat16 only where it is native).
        "--dtype", placement.dtype or serving.dtype,
    ]
    if placement.max_num_batched_tokens is not None:
        # The activation memory sizing reserved assumes this batch budget; vLLM must not exceed it.
        args += ["--max-num-batched-tokens", str(placement.max_num_batched_tokens)]
    if serving.quantization is not None:
        args += ["--quantization", VLLM_QUANTIZATION[serving.quantization]]
    if serving.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", serving.kv_cache_dtype]
    return args
