"""Which `vllm serve` flags a tenant may pass in `spec.serving.extraArgs`, and how vLLM reads them.

The rule: a tenant may set only the flags of an allow-list (`TENANT_VLLM_FLAGS`, which the platform
team can extend with `OperatorConfig.tenantVllmFlags`). A flag is allowed when it is safe for a
tenant: it tunes the engine or the OpenAI frontend of the tenant's own pods and nothing more. It does
not load code or plugins, choose other weights, tokenizers or configs than the pinned ones, read
local files, open connections, set keys or TLS, hide vLLM's metrics from the operator, or contradict
a flag the operator sets.

vLLM's parser (an argparse parser, vLLM 0.32) reads an argument the way `resolve` does:
- `--flag value` and `--flag=value`; underscores in a flag's name read as dashes, and
  `--flag.key value` sets one key of a JSON flag.
- Abbreviations: argparse's `allow_abbrev` is on (vLLM never turns it off), so any beginning of a
  flag's name that only one flag starts with is that flag (`--quantiz` is `--quantization`); a
  beginning that several flags share is refused by vLLM as ambiguous, and a flag's full name always
  wins over longer flags it begins (`--model` is `--model`, not `--model-impl`).
- Boolean flags come in pairs: `--enable-prefix-caching` and `--no-enable-prefix-caching`.
So an abbreviation is accepted only when it stands for exactly one flag of vLLM's whole flag set
(`VLLM_SERVE_FLAGS`) and that flag is allowed; an abbreviation that a refused flag also starts with
is refused. A flag vLLM does not know, a short option (`-tp`), `--` and a name with anything but
lowercase letters, digits and dashes are refused too.

Where it is checked: the CRD's CEL rule refuses, at admission, every flag in `FORBIDDEN_VLLM_FLAGS`
(the flags the operator manages, and those no configuration may allow) and every beginning of one,
so their abbreviations too, except the full name of another flag (`ADMITTED_BEGINNINGS`). Admission
cannot know a platform's extension of the allow-list, so the rest is the planner's: a model with any
other flag outside the allow-list is Degraded with reason `ExtraArgsRefused`, naming the flag (never
its value), and no Deployment is made for it.

Everything here is bounded: at most 32 arguments of 256 characters (the CRD's limits) are compared
with a fixed list of names by prefix; no pattern is built from what a tenant wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Every option string of `vllm serve` in vLLM 0.32.0 (the version the stand-in follows and the local
# cluster's CPU nodes run), as its argument parser declares them: the frontend's, the engine's and the
# serve command's own flags, the `--no-` twin of every boolean flag, and the short options. A test
# checks this against the dump of the real parser (e2e/standin/vllm-serve-actions.json), which the
# stand-in declares its parser from.
VLLM_SERVE_FLAGS: tuple[str, ...] = (
    "--additional-config", "--aggregate-engine-logging", "--all2all-backend", "--allow-credentials",
    "--allow-deprecated-quantization", "--allowed-headers", "--allowed-local-media-path", "--allowed-media-domains",
    "--allowed-methods", "--allowed-origins", "--anthropic-disabled-thinking-effort", "--api-key",
    "--api-server-count", "--async-scheduling", "--attention-backend", "--attention-config", "--aux-output-config",
    "--block-size", "--chat-template", "--chat-template-content-format", "--code-revision", "--cohere-format",
    "--cohere-is-reasoning-model", "--collect-detailed-traces", "--compilation-config", "--config",
    "--config-format", "--convert", "--cp-kv-cache-interleave-size", "--cpu-distributed-timeout-seconds",
    "--cpu-offload-gb", "--cpu-offload-params", "--cudagraph-capture-sizes", "--cudagraph-metrics",
    "--custom-histogram-buckets", "--data-parallel-address", "--data-parallel-backend",
    "--data-parallel-external-lb", "--data-parallel-hybrid-lb", "--data-parallel-multi-port-external-lb",
    "--data-parallel-rank", "--data-parallel-rpc-port", "--data-parallel-size", "--data-parallel-size-local",
    "--data-parallel-start-rank", "--data-parallel-supervisor-port", "--dbo-decode-token-threshold",
    "--dbo-prefill-token-threshold", "--dcp-comm-backend", "--dcp-kv-cache-interleave-size", "--dcp-q-replicate",
    "--decode-context-parallel-size", "--default-chat-template-kwargs", "--default-mm-loras", "--device-ids",
    "--device-memory-utilization", "--diffusion-config", "--disable-access-log-for-endpoints",
    "--disable-cascade-attn", "--disable-chunked-mm-input", "--disable-custom-all-reduce", "--disable-fastapi-docs",
    "--disable-hybrid-kv-cache-manager", "--disable-log-stats", "--disable-nccl-for-dp-synchronization",
    "--disable-sliding-window", "--disable-uvicorn-access-log", "--distributed-executor-backend",
    "--distributed-timeout-seconds", "--download-dir", "--dp-supervisor-probe-failure-threshold",
    "--dp-supervisor-probe-interval-s", "--dp-supervisor-probe-timeout-s", "--dp-sync-interval", "--dtype",
    "--ec-manager-config", "--ec-transfer-config", "--elastic-ep-max-dp-size", "--enable-auto-tool-choice",
    "--enable-batch-sharded-sampling", "--enable-chunked-prefill", "--enable-cumem-allocator", "--enable-dbo",
    "--enable-elastic-ep", "--enable-ep-weight-filter", "--enable-eplb", "--enable-expert-parallel",
    "--enable-fault-tolerance", "--enable-flash-late-interaction", "--enable-flashinfer-autotune",
    "--enable-force-include-usage", "--enable-hc-sp", "--enable-layerwise-nvtx-tracing", "--enable-log-deltas",
    "--enable-log-outputs", "--enable-log-requests", "--enable-logging-iteration-details", "--enable-lora",
    "--enable-mamba-cache-stochastic-rounding", "--enable-mamba-shared-prefix-checkpoint", "--enable-mfu-metrics",
    "--enable-mixed-moe-lora-format", "--enable-mm-embeds", "--enable-moe-shared-loras",
    "--enable-nccl-comm-suspend", "--enable-offline-docs", "--enable-per-request-metrics",
    "--enable-prefix-caching", "--enable-prompt-embeds", "--enable-prompt-tokens-details",
    "--enable-request-id-headers", "--enable-return-routed-experts", "--enable-scale-out",
    "--enable-server-load-tracking", "--enable-shm-tensor-arena", "--enable-sleep-mode", "--enable-ssl-refresh",
    "--enable-tokenizer-info-endpoint", "--enable-tower-connector-lora", "--enable-trace-replay", "--enforce-eager",
    "--engram-config", "--eplb-config", "--exclude-tools-when-tool-choice-none", "--expert-placement-strategy",
    "--fail-on-environ-validation", "--fault-tolerance-config", "--fingerprint-mode", "--fingerprint-value",
    "--fully-sharded-loras", "--gdn-prefill-backend", "--generation-config", "--gpu-memory-utilization", "--grpc",
    "--grpc-port", "--h11-max-header-count", "--h11-max-incomplete-event-size", "--headless", "--help",
    "--hf-config-path", "--hf-overrides", "--hf-token", "--host", "--ignore-patterns", "--interleave-mm-strings",
    "--io-processor-plugin", "--ir-op-priority", "--jit-monitor-mode", "--jit-monitor-verbose",
    "--kda-decode-backend", "--kda-prefill-backend", "--kernel-config", "--kv-cache-dtype",
    "--kv-cache-dtype-skip-layers", "--kv-cache-memory-bytes", "--kv-cache-metrics", "--kv-cache-metrics-sample",
    "--kv-events-config", "--kv-offloading-backend", "--kv-offloading-size", "--kv-sharing-fast-prefill",
    "--kv-transfer-config", "--language-model-only", "--limit-mm-per-prompt", "--linear-backend", "--load-format",
    "--log-config-file", "--log-error-stack", "--log-level", "--logging-config", "--logits-processors",
    "--logprobs-mode", "--long-prefill-token-threshold", "--long-prefill-token-threshold-adaptive", "--lora-dtype",
    "--lora-modules", "--lora-target-modules", "--mamba-backend", "--mamba-block-size", "--mamba-cache-dtype",
    "--mamba-cache-mode", "--mamba-cache-philox-rounds", "--mamba-ssm-cache-dtype", "--mamba-ssu-algorithm",
    "--master-addr", "--master-port", "--max-cpu-loras", "--max-cudagraph-capture-size", "--max-log-len",
    "--max-logprobs", "--max-lora-cls-labels", "--max-lora-rank", "--max-loras", "--max-model-len",
    "--max-num-active-seqs", "--max-num-batched-tokens", "--max-num-queued-reqs", "--max-num-queued-tokens",
    "--max-num-scheduled-tokens", "--max-num-seqs", "--max-parallel-loading-workers", "--media-io-kwargs",
    "--middleware", "--mm-device-do-normalize", "--mm-encoder-attn-backend", "--mm-encoder-attn-dtype",
    "--mm-encoder-fp8-scale-path", "--mm-encoder-fp8-scale-save-margin", "--mm-encoder-fp8-scale-save-path",
    "--mm-encoder-only", "--mm-encoder-tp-mode", "--mm-hasher-algorithm", "--mm-ipc-gpu-memory-gb",
    "--mm-processor-cache-gb", "--mm-processor-cache-type", "--mm-processor-device", "--mm-processor-kwargs",
    "--mm-shm-cache-max-object-size-mb", "--mm-tensor-ipc", "--model", "--model-class-overrides", "--model-impl",
    "--model-loader-extra-config", "--moe-backend", "--nnodes", "--no-allow-credentials",
    "--no-allow-deprecated-quantization", "--no-async-scheduling", "--no-cohere-is-reasoning-model",
    "--no-cudagraph-metrics", "--no-data-parallel-external-lb", "--no-data-parallel-hybrid-lb",
    "--no-dcp-q-replicate", "--no-disable-cascade-attn", "--no-disable-chunked-mm-input",
    "--no-disable-custom-all-reduce", "--no-disable-fastapi-docs", "--no-disable-hybrid-kv-cache-manager",
    "--no-disable-nccl-for-dp-synchronization", "--no-disable-sliding-window", "--no-disable-uvicorn-access-log",
    "--no-enable-auto-tool-choice", "--no-enable-batch-sharded-sampling", "--no-enable-chunked-prefill",
    "--no-enable-cumem-allocator", "--no-enable-dbo", "--no-enable-elastic-ep", "--no-enable-ep-weight-filter",
    "--no-enable-eplb", "--no-enable-expert-parallel", "--no-enable-fault-tolerance",
    "--no-enable-flash-late-interaction", "--no-enable-flashinfer-autotune", "--no-enable-force-include-usage",
    "--no-enable-hc-sp", "--no-enable-layerwise-nvtx-tracing", "--no-enable-log-deltas", "--no-enable-log-outputs",
    "--no-enable-log-requests", "--no-enable-logging-iteration-details", "--no-enable-lora",
    "--no-enable-mamba-cache-stochastic-rounding", "--no-enable-mamba-shared-prefix-checkpoint",
    "--no-enable-mfu-metrics", "--no-enable-mixed-moe-lora-format", "--no-enable-mm-embeds",
    "--no-enable-moe-shared-loras", "--no-enable-nccl-comm-suspend", "--no-enable-offline-docs",
    "--no-enable-per-request-metrics", "--no-enable-prefix-caching", "--no-enable-prompt-embeds",
    "--no-enable-prompt-tokens-details", "--no-enable-request-id-headers", "--no-enable-return-routed-experts",
    "--no-enable-scale-out", "--no-enable-server-load-tracking", "--no-enable-shm-tensor-arena",
    "--no-enable-sleep-mode", "--no-enable-ssl-refresh", "--no-enable-tokenizer-info-endpoint",
    "--no-enable-tower-connector-lora", "--no-enable-trace-replay", "--no-enforce-eager",
    "--no-exclude-tools-when-tool-choice-none", "--no-fail-on-environ-validation", "--no-fully-sharded-loras",
    "--no-interleave-mm-strings", "--no-jit-monitor-verbose", "--no-kv-cache-metrics",
    "--no-kv-sharing-fast-prefill", "--no-language-model-only", "--no-log-error-stack",
    "--no-long-prefill-token-threshold-adaptive", "--no-mm-device-do-normalize", "--no-mm-encoder-only",
    "--no-numa-bind", "--no-ray-workers-use-nsight", "--no-return-sampling-mask", "--no-return-tokens-as-token-ids",
    "--no-scheduler-reserve-full-isl", "--no-skip-mm-profiling", "--no-skip-tokenizer-init",
    "--no-sleep-mode-offload-cudagraph", "--no-specialize-active-lora", "--no-swa-bounded-replay",
    "--no-tokens-only", "--no-trust-remote-code", "--no-trust-request-chat-template",
    "--no-trust-request-mm-kwargs", "--no-use-fp64-gumbel", "--no-use-replayssm", "--no-use-tqdm-on-load",
    "--node-rank", "--num-gpu-blocks-override", "--numa-bind", "--numa-bind-cpus", "--numa-bind-nodes",
    "--offload-backend", "--offload-group-size", "--offload-num-in-group", "--offload-params",
    "--offload-prefetch-step", "--optimization-level", "--otlp-traces-endpoint", "--override-generation-config",
    "--per-request-spec-decode-metrics", "--performance-mode", "--pipeline-parallel-size", "--pooler-config",
    "--port", "--prefill-context-parallel-size", "--prefill-schedule-interval", "--prefix-cache-retention-interval",
    "--prefix-caching-hash-algo", "--prefix-match-unit", "--profiler-config", "--pt-load-map-location",
    "--quantization", "--quantization-config", "--ray-workers-use-nsight", "--reasoning-config",
    "--reasoning-parser", "--reasoning-parser-plugin", "--renderer-num-workers", "--replayssm-buffer-len",
    "--response-role", "--return-sampling-mask", "--return-tokens-as-token-ids", "--revision", "--root-path",
    "--runner", "--safetensors-load-strategy", "--safetensors-prefetch-block-size",
    "--safetensors-prefetch-num-threads", "--scheduler-cls", "--scheduler-reserve-full-isl", "--scheduling-policy",
    "--seed", "--served-model-name", "--show-hidden-metrics-for-version", "--shutdown-timeout",
    "--skip-mm-profiling", "--skip-tokenizer-init", "--sleep-mode-offload-cudagraph",
    "--sleep-preserve-parameter-names", "--sparse-indexer-topk-backend", "--spec-method", "--spec-model",
    "--spec-tokens", "--specialize-active-lora", "--speculative-config", "--sse-keep-alive-interval",
    "--ssl-ca-certs", "--ssl-cert-reqs", "--ssl-certfile", "--ssl-ciphers", "--ssl-keyfile", "--stream-interval",
    "--structured-outputs-config", "--swa-bounded-replay", "--tensor-parallel-size", "--tokenizer",
    "--tokenizer-mode", "--tokenizer-revision", "--tokens-only", "--tool-call-parser", "--tool-parser-plugin",
    "--tool-server", "--tool-strict-level", "--trust-remote-code", "--trust-request-chat-template",
    "--trust-request-mm-kwargs", "--ubatch-size", "--uds", "--use-fp64-gumbel", "--use-replayssm",
    "--use-tqdm-on-load", "--uvicorn-log-level", "--video-pruning-method", "--video-pruning-rate", "--watermark",
    "--watermark-config", "--weight-transfer-config", "--worker-cls", "--worker-extension-cls",
    "-ac", "-asc", "-cc", "-dc", "-dcp", "-dp", "-dpa", "-dpb", "-dpe", "-dph", "-dpl", "-dpm", "-dpn", "-dpp",
    "-dpr", "-ep", "-h", "-n", "-pcp", "-pp", "-q", "-r", "-sc", "-tp",
)

# vLLM flags the operator sets itself (vllm_args.py); passing them would contradict the placement.
MANAGED_VLLM_FLAGS = (
    "--model",
    "--host",
    "--port",
    "--served-model-name",
    "--tensor-parallel-size",
    "--gpu-memory-utilization",
    "--device-memory-utilization",  # vLLM 0.32's other name for --gpu-memory-utilization
    "--max-model-len",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--dtype",
    "--quantization",
    "--kv-cache-dtype",
)

# Flags no tenant may set, whatever the platform allows: the managed ones, and those that would
# defeat the pin, run code, read files, open connections or blind the operator. The CRD refuses them
# and every beginning of them (their abbreviations); OperatorConfig refuses to allow them.
FORBIDDEN_VLLM_FLAGS: tuple[str, ...] = (
    *MANAGED_VLLM_FLAGS,
    # override what the operator sized, or put the KV cache or weights in memory it did not size
    "--kv-cache-memory-bytes", "--num-gpu-blocks-override", "--kv-offloading-size", "--kv-offloading-backend",
    "--quantization-config",
    # run code or plugins that are not vLLM's own
    "--trust-remote-code", "--worker-cls", "--worker-extension-cls", "--scheduler-cls", "--middleware",
    "--tool-parser-plugin", "--reasoning-parser-plugin", "--io-processor-plugin", "--logits-processors",
    "--model-class-overrides", "--compilation-config", "--additional-config", "--kv-transfer-config",
    "--ec-transfer-config", "--ec-manager-config",
    # serve other weights, tokenizers or configs than the pinned ones, or fake the weights
    "--load-format", "--model-loader-extra-config", "--download-dir", "--ignore-patterns", "--revision",
    "--code-revision", "--tokenizer", "--tokenizer-revision", "--hf-config-path", "--hf-overrides", "--hf-token",
    "--config", "--config-format", "--generation-config", "--speculative-config", "--spec-model",
    "--lora-modules", "--default-mm-loras", "--weight-transfer-config",
    # read local files, or let requests do it
    "--allowed-local-media-path", "--chat-template", "--trust-request-chat-template", "--log-config-file",
    "--logging-config", "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs", "--ssl-cert-reqs", "--ssl-ciphers",
    "--enable-ssl-refresh", "--mm-encoder-fp8-scale-path", "--mm-encoder-fp8-scale-save-path", "--profiler-config",
    # open connections or send data elsewhere
    "--otlp-traces-endpoint", "--tool-server", "--kv-events-config", "--data-parallel-address",
    "--data-parallel-rpc-port", "--data-parallel-supervisor-port", "--master-addr", "--master-port", "--nnodes",
    "--node-rank", "--grpc", "--grpc-port", "--uds",
    # lock the operator out of the server or blind it (probes, evaluations, /metrics)
    "--api-key", "--disable-log-stats", "--custom-histogram-buckets",
)

# Full names of flags that are not forbidden but begin one that is (`--reasoning-parser` begins
# `--reasoning-parser-plugin`): vLLM reads a full name as itself, so admission lets these through by name
# while still refusing every other beginning of a forbidden flag.
ADMITTED_BEGINNINGS: tuple[str, ...] = tuple(sorted(
    f for f in VLLM_SERVE_FLAGS
    if f.startswith("--") and f not in FORBIDDEN_VLLM_FLAGS and any(g.startswith(f) for g in FORBIDDEN_VLLM_FLAGS)))

# The tenant allow-list: engine and frontend tuning of the tenant's own pods.
TENANT_VLLM_FLAGS: tuple[str, ...] = (
    "--enable-prefix-caching", "--no-enable-prefix-caching", "--prefix-caching-hash-algo",
    "--enable-chunked-prefill", "--no-enable-chunked-prefill", "--long-prefill-token-threshold", "--scheduling-policy",
    "--enforce-eager", "--no-enforce-eager", "--disable-cascade-attn", "--no-disable-cascade-attn",
    "--seed", "--max-logprobs", "--logprobs-mode",
    "--enable-auto-tool-choice", "--no-enable-auto-tool-choice", "--tool-call-parser",
    "--exclude-tools-when-tool-choice-none", "--no-exclude-tools-when-tool-choice-none", "--reasoning-parser",
    "--chat-template-content-format", "--response-role",
    "--return-tokens-as-token-ids", "--no-return-tokens-as-token-ids",
    "--enable-prompt-tokens-details", "--no-enable-prompt-tokens-details",
    "--enable-force-include-usage", "--no-enable-force-include-usage",
    "--enable-request-id-headers", "--no-enable-request-id-headers",
    "--disable-fastapi-docs", "--no-disable-fastapi-docs",
    "--disable-uvicorn-access-log", "--no-disable-uvicorn-access-log",
)

# What a refusal may quote of a tenant's argument: its flag name, cut to this length.
MAX_QUOTED_NAME = 64
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
# What a refusal quotes as written: a name of these characters (else it says "an argument").
_QUOTABLE = _NAME_CHARS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_.+")


@dataclass(frozen=True)
class RefusedArg:
    """One refused element of extraArgs: what it says as a flag (never its value) and why."""

    flag: str
    reason: str

    def __str__(self) -> str:
        return f"{self.flag} ({self.reason})"


def flag_name(arg: str) -> str:
    """The flag an argument names as vLLM reads it: before any `=` and any `.`, underscores as dashes."""
    return arg.split("=", 1)[0].split(".", 1)[0].replace("_", "-")


def is_plain_flag(name: str) -> bool:
    """`--` and a lowercase name of letters, digits and dashes: the shape the CRD admits."""
    return len(name) > 2 and name.startswith("--") and name[2] != "-" and set(name[2:]) <= _NAME_CHARS


def _digits(text: str) -> bool:
    return text != "" and all(c in "0123456789" for c in text)


def _is_negative_number(arg: str) -> bool:
    """argparse reads `-1` and `-.5` as values, not options (vLLM has no option that looks like one)."""
    whole, dot, fraction = arg[1:].partition(".")
    return (whole == "" or _digits(whole)) and _digits(fraction) if dot else _digits(whole)


def resolve(name: str, known: Iterable[str]) -> tuple[str, ...]:
    """The flags of `known` that `name` stands for, as argparse resolves it: itself if it is one,
    else every flag it begins (one: an abbreviation; several: ambiguous; none: unknown)."""
    flags = tuple(known)
    if name in flags:
        return (name,)
    return tuple(sorted({f for f in flags if f.startswith(name)}))


def extension_problem(flag: str) -> str | None:
    """Why the platform may not add `flag` to the allow-list; None if it may. A forbidden flag, or a
    beginning of one (vLLM would read it as that flag), never; nor a name vLLM 0.32 does not have that
    begins one of its flags (vLLM would read it as an abbreviation of that flag, or refuse it)."""
    if not is_plain_flag(flag):
        return "not a --name of lowercase letters, digits and dashes"
    if forbidden := [f for f in FORBIDDEN_VLLM_FLAGS if f.startswith(flag)]:
        return f"tenants may never set {forbidden[0]}: the operator manages it, or it defeats the pinned " \
               "weights, runs code, reads files, opens connections or blinds the operator"
    if flag not in VLLM_SERVE_FLAGS and (begun := [f for f in VLLM_SERVE_FLAGS if f.startswith(flag)]):
        return f"not a vLLM flag, and vLLM would read it as an abbreviation of {begun[0]}"
    return None


def refused_extra_args(extra_args: Sequence[str], extra_allowed: Iterable[str] = ()) -> list[RefusedArg]:
    """The elements of extraArgs a tenant may not pass, with the reason for each.

    Allowed: values (elements not starting with `-`, and negative numbers), and flags (`--name` or
    `--name=value`) whose name is, or unambiguously abbreviates, a flag of `TENANT_VLLM_FLAGS` or
    `extra_allowed`. What `extension_problem` finds wrong in `extra_allowed` is left out of it."""
    extension = tuple(f for f in extra_allowed if extension_problem(f) is None)
    allowed = frozenset((*TENANT_VLLM_FLAGS, *extension))
    known = (*VLLM_SERVE_FLAGS, *(f for f in extension if f not in VLLM_SERVE_FLAGS))
    refused: list[RefusedArg] = []
    for arg in extra_args:
        if not arg.startswith("-") or _is_negative_number(arg):
            continue  # a value: of the flag before it, or a stray positional vLLM refuses itself
        if arg == "--":
            refused.append(RefusedArg("--", "ends vLLM's options: the operator's own flags after it would be ignored"))
            continue
        name, written = flag_name(arg), arg.split("=", 1)[0]
        quoted = written[:MAX_QUOTED_NAME] if set(written) <= _QUOTABLE else "an argument"
        if not arg.startswith("--"):
            refused.append(RefusedArg(quoted, "short options are not allowed; use the --long name"))
        elif not is_plain_flag(name) or name != written:
            refused.append(RefusedArg(quoted, "only --name or --name=value with a lowercase name of letters, digits "
                                              "and dashes is allowed"))
        elif (reason := _refusal(name, resolve(name, known), allowed)) is not None:
            refused.append(RefusedArg(quoted, reason))
    return refused


def _refusal(name: str, flags: tuple[str, ...], allowed: frozenset[str]) -> str | None:
    if not flags:
        return "not a vLLM flag"
    if len(flags) > 1:
        shown = ", ".join(flags[:4]) + (", ..." if len(flags) > 4 else "")
        return f"ambiguous: vLLM refuses an abbreviation of several flags ({shown})"
    flag = flags[0]
    what = "" if flag == name else f"abbreviates {flag}, which is "
    if flag in MANAGED_VLLM_FLAGS:
        return f"{what}set by the operator" if what else "the operator sets this flag"
    if flag in FORBIDDEN_VLLM_FLAGS:
        return f"{what}never allowed for tenants" if what else "never allowed for tenants"
    if flag not in allowed:
        return f"{what}not on the allow-list" if what else "not on the allow-list"
    return None
