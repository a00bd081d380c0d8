"""An OpenAI-compatible stand-in for vLLM's server, for machines without a GPU.

It takes `vllm serve`'s command line (the flags are declared below with vLLM's names, types and
choices; an unknown flag fails as vLLM's parser fails: usage, `vllm serve: error: unrecognized
arguments: ...`, exit 2), checks what vLLM checks at start-up that matters to an operator
(config.json present, tensor-parallel size divides the attention heads, max-model-len within the
model's, gpu-memory-utilization in (0, 1]), and serves vLLM's HTTP surface: /health, /v1/models,
/v1/chat/completions, /v1/completions and /metrics with vLLM's metric names.

What it answers comes from `standin.json` in the model directory, so a good and a bad model
revision are simply two weight directories:

    {"responses": [{"prompt": "...", "completion": "..."}], "default_completion": "...",
     "latency_ms": {"mean": 50, "p95": 80}, "error_rate": 0.0, "startup_seconds": 0}

Binding: in a pod, vLLM's default host (all interfaces) means the pod's own IP. Run as a pod by
the node agent, the stand-in gets that IP in SLMFLEET_POD_IP and binds it instead of 0.0.0.0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

QUANTIZATION_METHODS = [
    "aqlm", "awq", "deepspeedfp", "tpu_int8", "fp8", "ptpc_fp8", "fbgemm_fp8", "modelopt",
    "modelopt_fp4", "marlin", "bitblas", "gguf", "gptq_marlin_24", "gptq_marlin", "gptq_bitblas",
    "awq_marlin", "gptq", "compressed-tensors", "bitsandbytes", "qqq", "hqq", "experts_int8",
    "neuron_quant", "ipex", "quark", "moe_wna16", "torchao", "auto-round", "rtn", "inc", "mxfp4",
]
KV_CACHE_DTYPES = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc"]
DTYPES = ["auto", "half", "float16", "bfloat16", "float", "float32"]
LOAD_FORMATS = [
    "auto", "pt", "safetensors", "npcache", "dummy", "tensorizer", "sharded_state", "gguf",
    "bitsandbytes", "mistral", "runai_streamer", "runai_streamer_sharded", "fastsafetensors",
]
# vLLM's default buckets for request latency histograms (seconds).
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class StartupError(Exception):
    """What makes vLLM exit before it starts listening."""


def _max_model_len(value: str) -> int:
    """vLLM accepts plain integers and human-readable sizes such as 32k or 1m."""
    text = value.strip().lower()
    scale = {"k": 1000, "m": 1000**2, "g": 1000**3}
    if text and text[-1] in scale:
        return int(float(text[:-1]) * scale[text[-1]])
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm serve", description="Start the vLLM OpenAI-compatible API server.")
    p.add_argument("model_tag", nargs="?", default=None, help="The model tag to serve (optional if specified in config)")
    p.add_argument("--config", help="Read CLI options from a config file (YAML).")
    # Frontend
    p.add_argument("--host")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uds")
    p.add_argument("--uvicorn-log-level", choices=["critical", "debug", "error", "info", "trace", "warning"], default="info")
    p.add_argument("--disable-uvicorn-access-log", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--allow-credentials", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--allowed-origins", default='["*"]')
    p.add_argument("--allowed-methods", default='["*"]')
    p.add_argument("--allowed-headers", default='["*"]')
    p.add_argument("--api-key", nargs="+")
    p.add_argument("--lora-modules", nargs="+")
    p.add_argument("--chat-template")
    p.add_argument("--chat-template-content-format", choices=["auto", "openai", "string"], default="auto")
    p.add_argument("--response-role", default="assistant")
    p.add_argument("--ssl-keyfile")
    p.add_argument("--ssl-certfile")
    p.add_argument("--ssl-ca-certs")
    p.add_argument("--root-path")
    p.add_argument("--middleware", action="append", default=[])
    p.add_argument("--return-tokens-as-token-ids", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--disable-frontend-multiprocessing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-request-id-headers", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--tool-call-parser")
    p.add_argument("--max-log-len", type=int)
    p.add_argument("--disable-fastapi-docs", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-prompt-tokens-details", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-server-load-tracking", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-force-include-usage", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--disable-log-requests", action="store_true")
    p.add_argument("--disable-log-stats", action="store_true")
    p.add_argument("--api-server-count", "-asc", type=int, default=1)
    # Model
    p.add_argument("--model")
    p.add_argument("--runner", choices=["auto", "generate", "pooling", "draft"], default="auto")
    p.add_argument("--convert", choices=["auto", "none", "embed", "classify", "reward"], default="auto")
    p.add_argument("--tokenizer")
    p.add_argument("--tokenizer-mode", choices=["auto", "slow", "mistral", "custom"], default="auto")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-config-path")
    p.add_argument("--allowed-local-media-path", default="")
    p.add_argument("--revision")
    p.add_argument("--code-revision")
    p.add_argument("--tokenizer-revision")
    p.add_argument("--max-model-len", type=_max_model_len)
    p.add_argument("--quantization", "-q", choices=QUANTIZATION_METHODS)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument(
        "--logprobs-mode",
        choices=["raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs"],
        default="raw_logprobs",
    )
    p.add_argument("--disable-sliding-window", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--disable-cascade-attn", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--skip-tokenizer-init", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-prompt-embeds", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--config-format", choices=["auto", "hf", "mistral"], default="auto")
    p.add_argument("--hf-token", nargs="?", const=True)
    p.add_argument("--hf-overrides")
    p.add_argument("--pooler-config")
    p.add_argument("--logits-processor-pattern")
    p.add_argument("--generation-config", default="auto")
    p.add_argument("--override-generation-config")
    p.add_argument("--enable-sleep-mode", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--model-impl", choices=["auto", "vllm", "transformers", "terratorch"], default="auto")
    p.add_argument("--override-attention-dtype")
    # Load
    p.add_argument("--load-format", choices=LOAD_FORMATS, default="auto")
    p.add_argument("--download-dir")
    p.add_argument("--safetensors-load-strategy", default="lazy")
    p.add_argument("--model-loader-extra-config")
    p.add_argument("--ignore-patterns", nargs="+")
    p.add_argument("--use-tqdm-on-load", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--pt-load-map-location", default="cpu")
    # Structured outputs / reasoning
    p.add_argument("--reasoning-parser")
    p.add_argument("--structured-outputs-config")
    # Parallel
    p.add_argument("--distributed-executor-backend", choices=["ray", "mp", "uni", "external_launcher"])
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    p.add_argument("--data-parallel-rank", "-dpn", type=int)
    p.add_argument("--data-parallel-size-local", "-dpl", type=int)
    p.add_argument("--data-parallel-address", "-dpa")
    p.add_argument("--data-parallel-rpc-port", "-dpp", type=int)
    p.add_argument("--data-parallel-backend", "-dpb", choices=["mp", "ray"], default="mp")
    p.add_argument("--enable-expert-parallel", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--max-parallel-loading-workers", type=int)
    p.add_argument("--ray-workers-use-nsight", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--disable-custom-all-reduce", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--worker-cls", default="auto")
    # Cache
    p.add_argument("--block-size", type=int, choices=[1, 8, 16, 32, 64, 128, 256])
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-bytes", type=int)
    p.add_argument("--swap-space", type=float, default=4)
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    p.add_argument("--num-gpu-blocks-override", type=int)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--prefix-caching-hash-algo", choices=["sha256", "sha256_cbor"], default="sha256")
    p.add_argument("--cpu-offload-gb", type=float, default=0)
    p.add_argument("--calculate-kv-scales", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--kv-sharing-fast-prefill", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--mamba-cache-dtype", default="auto")
    # Multimodal
    p.add_argument("--limit-mm-per-prompt")
    p.add_argument("--mm-processor-kwargs")
    p.add_argument("--mm-processor-cache-gb", type=float, default=4)
    # LoRA
    p.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--lora-dtype", default="auto")
    p.add_argument("--max-cpu-loras", type=int)
    p.add_argument("--fully-sharded-loras", action=argparse.BooleanOptionalAction, default=False)
    # Observability
    p.add_argument("--show-hidden-metrics-for-version")
    p.add_argument("--otlp-traces-endpoint")
    p.add_argument("--collect-detailed-traces")
    # Scheduler
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-partial-prefills", type=int, default=1)
    p.add_argument("--max-long-partial-prefills", type=int, default=1)
    p.add_argument("--long-prefill-token-threshold", type=int, default=0)
    p.add_argument("--num-lookahead-slots", type=int, default=0)
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--disable-chunked-mm-input", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--scheduler-cls", default="vllm.core.scheduler.Scheduler")
    p.add_argument("--disable-hybrid-kv-cache-manager", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=False)
    # Engine extras
    p.add_argument("--speculative-config")
    p.add_argument("--kv-transfer-config")
    p.add_argument("--kv-events-config")
    p.add_argument("--compilation-config", "-O")
    p.add_argument("--additional-config")
    return p


@dataclass(frozen=True)
class Behaviour:
    """The contents of standin.json."""

    responses: dict[str, str]
    default_completion: str
    latency_mean_ms: float
    latency_p95_ms: float
    error_rate: float
    startup_seconds: float

    @classmethod
    def load(cls, model_dir: Path) -> Behaviour:
        path = model_dir / "standin.json"
        raw: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        latency = raw.get("latency_ms") or {}
        return cls(
            responses={str(r["prompt"]).strip(): str(r["completion"]) for r in raw.get("responses", [])},
            default_completion=str(raw.get("default_completion", "")),
            latency_mean_ms=float(latency.get("mean", 0)),
            latency_p95_ms=float(latency.get("p95", latency.get("mean", 0))),
            error_rate=float(raw.get("error_rate", 0.0)),
            startup_seconds=float(raw.get("startup_seconds", 0)),
        )

    def completion_for(self, prompt: str) -> str:
        return self.responses.get(prompt.strip(), self.default_completion)

    def sample_latency_s(self, rng: random.Random) -> float:
        """A log-normal latency with the configured mean and 95th percentile."""
        mean, p95 = self.latency_mean_ms, self.latency_p95_ms
        if mean <= 0:
            return 0.0
        z95 = 1.6448536269514722
        gap = math.log(p95) - math.log(mean) if p95 > mean else 0.0
        disc = z95 * z95 - 2 * gap
        sigma = z95 - math.sqrt(disc) if disc > 0 else z95
        mu = math.log(mean) - sigma * sigma / 2
        return rng.lognormvariate(mu, sigma) / 1000.0


@dataclass
class Engine:
    model_path: Path
    served_names: list[str]
    max_model_len: int
    behaviour: Behaviour
    rng: random.Random
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        labels = ["model_name"]
        r = self.registry
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            registry=r,
            buckets=TTFT_BUCKETS,
        )
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, registry=r)
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels + ["finished_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r)
        # vLLM's server exposes per-status HTTP counts (prometheus-fastapi-instrumentator).
        self.http = Counter(
            "http_requests",
            "Total number of requests by method, status and handler.",
            ["method", "status", "handler"],
            registry=r,
        )
        name = self.served_names[0]
        for g in (self.running, self.waiting, self.kv_usage):
            g.labels(model_name=name).set(0)
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name=name, finished_reason=reason)


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": kind, "param": None, "code": status}, status=status)


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


def make_app(engine: Engine) -> web.Application:
    name = engine.served_names[0]

    @web.middleware
    async def count_http(request: web.Request, handler):
        response = await handler(request)
        if request.path.startswith("/v1/"):
            engine.http.labels(method=request.method, status=f"{response.status // 100}xx", handler=request.path).inc()
        return response

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(_: web.Request) -> web.Response:
        created = int(time.time())
        data = [
            {"id": served, "object": "model", "created": created, "owned_by": "vllm",
             "root": str(engine.model_path), "parent": None, "max_model_len": engine.max_model_len,
             "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": created,
                             "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                             "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                             "organization": "*", "group": None, "is_blocking": False}]}
            for served in engine.served_names
        ]
        return web.json_response({"object": "list", "data": data})

    async def generate(request: web.Request, chat: bool) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "Request body is not valid JSON.", "BadRequestError")
        model = body.get("model", name)
        if model not in engine.served_names:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return _error(400, "messages must be a non-empty list", "BadRequestError")
            users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            content = users[-1].get("content", "") if users else ""
            if isinstance(content, list):  # content parts
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            prompt = str(content)
            prompt_text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        else:
            raw = body.get("prompt")
            prompt = raw[0] if isinstance(raw, list) and raw else raw
            if not isinstance(prompt, str):
                return _error(400, "prompt must be a string", "BadRequestError")
            prompt_text = prompt
        prompt_tokens = _tokens(prompt_text)
        if prompt_tokens >= engine.max_model_len:
            return _error(400, f"This model's maximum context length is {engine.max_model_len} tokens. "
                               f"However, your request has {prompt_tokens} input tokens.", "BadRequestError")
        labels = {"model_name": name}
        engine.running.labels(**labels).inc()
        started = time.perf_counter()
        try:
            await asyncio.sleep(engine.behaviour.sample_latency_s(engine.rng))
            if engine.rng.random() < engine.behaviour.error_rate:
                return _error(500, "The engine failed to process the request (stand-in injected error).", "InternalServerError")
            text = engine.behaviour.completion_for(prompt)
            max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
            finish = "stop"
            words = text.split(" ")
            if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
                text, finish = " ".join(words[:max_tokens]), "length"
            completion_tokens = _tokens(text) if text else 0
            elapsed = time.perf_counter() - started
            engine.e2e.labels(**labels).observe(elapsed)
            engine.ttft.labels(**labels).observe(elapsed * 0.3)
            engine.success.labels(finished_reason=finish, **labels).inc()
            engine.prompt_tokens.labels(**labels).inc(prompt_tokens)
            engine.generation_tokens.labels(**labels).inc(completion_tokens)
        finally:
            engine.running.labels(**labels).dec()
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        created = int(time.time())
        if chat:
            return web.json_response({
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                             "logprobs": None, "finish_reason": finish, "stop_reason": None}],
                "usage": usage,
            })
        return web.json_response({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}],
            "usage": usage,
        })

    async def chat(request: web.Request) -> web.Response:
        return await generate(request, chat=True)

    async def completions(request: web.Request) -> web.Response:
        return await generate(request, chat=False)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(engine.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[count_http])
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    return app


def prepare(args: argparse.Namespace) -> Engine:
    """vLLM's start-up checks, in the order that matters here."""
    model = args.model_tag or args.model
    if not model:
        raise StartupError("No model specified: pass it as `vllm serve <model>` or --model.")
    path = Path(model)
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        # With HF_HUB_OFFLINE=1 vLLM cannot fall back to the hub: a path without config.json is fatal.
        raise StartupError(f"Invalid repository ID or local directory specified: '{model}'. "
                           f"No config.json found in {path}.")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise StartupError(f"{config_file} is not valid JSON: {exc}") from exc
    heads = int(config.get("num_attention_heads") or 0)
    tp = args.tensor_parallel_size
    if tp < 1:
        raise StartupError("tensor_parallel_size must be >= 1")
    if heads and heads % tp:
        raise StartupError(f"Total number of attention heads ({heads}) must be divisible by tensor parallel size ({tp}).")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise StartupError(f"GPU memory utilization must be within (0, 1]. Got {args.gpu_memory_utilization}.")
    derived = int(config.get("max_position_embeddings") or 2048)
    max_len = args.max_model_len or derived
    if max_len > derived:
        raise StartupError(f"User-specified max_model_len ({max_len}) is greater than the derived max_model_len "
                           f"(max_position_embeddings={derived} in model's config.json).")
    served = args.served_model_name or [model]
    return Engine(path, served, max_len, Behaviour.load(path), random.Random(args.seed))


def bind_host(requested: str | None) -> str:
    if requested in (None, "", "0.0.0.0", "::"):
        return os.environ.get("SLMFLEET_POD_IP", "127.0.0.1")
    return requested


async def serve(engine: Engine, host: str, port: int) -> None:
    # vLLM only opens its port once the weights are loaded.
    if engine.behaviour.startup_seconds:
        print(f"INFO Loading weights from {engine.model_path} ...", flush=True)
        await asyncio.sleep(engine.behaviour.startup_seconds)
    runner = web.AppRunner(make_app(engine), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"INFO Started server process; serving {engine.served_names} on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("INFO Shutting down", flush=True)
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `vllm serve ...` (the image's entrypoint) or the older `python -m vllm.entrypoints.openai.api_server ...`.
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    elif argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]:
        argv = argv[2:]
    else:
        print("usage: vllm [-h] [-v] {chat,complete,serve,bench,collect-env,run-batch} ...", file=sys.stderr)
        print(f"vllm: error: argument subparser: invalid choice: {argv[:1]}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)  # exits 2 with vLLM's message on an unknown flag
    try:
        engine = prepare(args)
    except StartupError as exc:
        print(f"ERROR {exc}", file=sys.stderr, flush=True)
        return 1
    asyncio.run(serve(engine, bind_host(args.host), args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
