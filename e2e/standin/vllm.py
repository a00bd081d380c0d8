"""An OpenAI-compatible stand-in for vLLM's server, for machines without a GPU.

It takes `vllm serve`'s command line (the flags are declared from a dump of the real vLLM's parser,
vllm-serve-actions.json: names, types, choices and defaults; an unknown flag fails as vLLM's parser
fails: usage, `vllm serve: error: unrecognized arguments: ...`, exit 2), checks what vLLM checks at
start-up that matters to an operator (config.json present, tensor-parallel size divides the
attention heads, max-model-len within the model's, gpu-memory-utilization in (0, 1]), and serves
vLLM's HTTP surface: /health, /v1/models, /v1/chat/completions, /v1/completions and /metrics.

/metrics exposes a few of vLLM's `vllm:` families (e2e latency and time to first token histograms with
vLLM's buckets, running/waiting requests, KV-cache usage, request successes by finished_reason, prompt
and generation tokens), each labelled as vLLM 0.32 labels it: `model_name` (the first served name) and
`engine` ("0": one engine, no data parallelism), plus the family's own labels. Every series exists from
start-up, as vLLM's do. A unit test holds each family (name, type, label names) to vllm-metrics.json,
the real vLLM's families dumped by e2e/real_vllm/metrics_dump.py. `http_requests_total{handler, method,
status}` counts the requests to /v1/ by status class ("2xx", "4xx", "5xx"), as vLLM's HTTP instrumentation
(prometheus-fastapi-instrumentator) does; the dump holds only `vllm:` families, so that one is not checked.

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

# vLLM's default buckets for request latency histograms (seconds).
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


# vLLM labels its engine metrics by the engine's index, one set of series per engine; a server without data
# parallelism has one engine, "0".
ENGINE_INDEX = "0"


class StartupError(Exception):
    """What makes vLLM exit before it starts listening."""


# `vllm serve`'s options as the real parser declares them (names, abbreviations, kinds, value types,
# choices, defaults), dumped from the real vLLM by e2e/real_vllm/serve_flags.py and shipped beside this
# module in the stand-in image. Declaring the parser from it is what keeps the stand-in from accepting
# a flag vLLM refuses, or refusing one it accepts.
SERVE_ACTIONS = Path(__file__).with_name("vllm-serve-actions.json")


def _human_int(value: str) -> int:
    """vLLM's human-readable integers: 32k is 32,000, 32K is 32,768; decimals with decimal multipliers."""
    text = value.strip()
    decimal = {"k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
    binary = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in decimal:
        return int(float(text[:-1]) * decimal[text[-1]])
    if text and text[-1] in binary:
        return int(text[:-1]) * binary[text[-1]]
    return int(text)


def _human_int_or_auto(value: str) -> int:
    return -1 if value.strip().lower() == "auto" else _human_int(value)


def _optional(parse: Any) -> Any:
    def parse_optional(value: str) -> Any:
        return None if value in ("", "None") else parse(value)
    parse_optional.__name__ = getattr(parse, "__name__", "value")  # argparse names it in "invalid ... value"
    return parse_optional


VALUE_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "human int": _human_int,
                               "human int or auto": _human_int_or_auto}


def _value_type(name: str | None) -> Any:
    if name is None:
        return None
    base = VALUE_TYPES[name.removeprefix("optional ")]
    return _optional(base) if name.startswith("optional ") else base


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm serve", description="Start the vLLM OpenAI-compatible API server.",
                                add_help=False)
    p.add_argument("model_tag", nargs="?", default=None, help="The model tag to serve (optional if specified in config)")
    for action in json.loads(SERVE_ACTIONS.read_text())["actions"]:
        options, kind = action["options"], action["kind"]
        kwargs: dict[str, Any] = {"dest": action["dest"]}
        if kind == "help":
            kwargs.update(action="help")
        elif kind == "store_true":
            kwargs.update(action="store_true", default=action["default"])
        elif kind == "boolean":
            options = [o for o in options if not o.startswith("--no-")]  # argparse adds the --no- twins
            kwargs.update(action=argparse.BooleanOptionalAction, default=action["default"])
        else:
            parse = _value_type(action["type"])
            default = action["default"]
            if isinstance(default, str) and default.startswith("'"):  # a structured default, dumped as its type
                default = None
            kwargs.update(action="append" if kind == "append" else "store", nargs=action["nargs"], default=default)
            if parse is not None:
                kwargs.update(type=parse)
            if action["choices"] is not None:
                kwargs.update(choices=[(parse or str)(c) for c in action["choices"]])
        p.add_argument(*options, **kwargs)
    return p


def vllm_argv(argv: list[str]) -> list[str]:
    """vLLM's parser reads `--flag_name` as `--flag-name` and `--json-flag.key value` as one key of a
    JSON flag; the stand-in reads the latter as the JSON flag itself (it only keeps the value)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            out.append(name.replace("_", "-").split(".", 1)[0] + eq + value)
        else:
            out.append(arg)
    return out


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
    # The label values of every `vllm:` series: {"model_name": the first served name, "engine": "0"}.
    metric_labels: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        labels = ["model_name", "engine"]  # vLLM's label names, in its order
        self.metric_labels = {"model_name": self.served_names[0], "engine": ENGINE_INDEX}
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
        # vLLM creates its series at start-up: a fresh server's page already has every family, at zero.
        for metric in (self.e2e, self.ttft, self.prompt_tokens, self.generation_tokens):
            metric.labels(**self.metric_labels)
        for g in (self.running, self.waiting, self.kv_usage):
            g.labels(**self.metric_labels).set(0)
        for reason in ("stop", "length", "abort"):
            self.success.labels(finished_reason=reason, **self.metric_labels)


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
        labels = engine.metric_labels
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
    max_len = derived if args.max_model_len in (None, -1) else args.max_model_len
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
    args = build_parser().parse_args(vllm_argv(argv))  # exits 2 with vLLM's message on an unknown flag
    try:
        engine = prepare(args)
    except StartupError as exc:
        print(f"ERROR {exc}", file=sys.stderr, flush=True)
        return 1
    asyncio.run(serve(engine, bind_host(args.host), args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
