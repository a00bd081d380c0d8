import asyncio
import json
import random
import statistics
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from e2e.standin import vllm


def model(tmp_path: Path, heads=16, max_len=4096, behaviour=None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": heads, "max_position_embeddings": max_len}))
    if behaviour is not None:
        (tmp_path / "standin.json").write_text(json.dumps(behaviour))
    return tmp_path


def parse(*argv):
    return vllm.build_parser().parse_args(vllm.vllm_argv(list(argv)))


def test_accepts_the_flags_an_operator_sets(tmp_path):
    args = parse(str(tmp_path), "--served-model-name", "a", "b", "--host", "0.0.0.0", "--port", "8000",
                 "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.85", "--max-model-len", "32k",
                 "--max-num-seqs", "16", "--dtype", "bfloat16", "--quantization", "awq", "--kv-cache-dtype", "fp8",
                 "--enable-prefix-caching", "--no-enable-chunked-prefill", "-tp", "2", "--no-enable-log-requests",
                 "--compilation_config.mode", "0")
    assert args.served_model_name == ["a", "b"]
    assert args.max_model_len == 32000
    assert args.enable_prefix_caching is True and args.enable_chunked_prefill is False


@pytest.mark.parametrize("argv, message", [
    (["--not-a-flag"], "unrecognized arguments: --not-a-flag"),
    (["--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
    (["--kv-cache-dtype", "magic"], "argument --kv-cache-dtype: invalid choice"),
    (["--disable-log-requests"], "unrecognized arguments: --disable-log-requests"),  # gone in vLLM 0.32
    (["--swap-space", "4"], "unrecognized arguments: --swap-space"),
    (["--tensor-parallel-size", "two"], "argument --tensor-parallel-size/-tp: invalid int value"),
])
def test_bad_flags_fail_as_vllm_fails(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        parse("/m", *argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vllm serve")
    assert f"vllm serve: error: {message}" in err


def test_main_requires_the_serve_subcommand(capsys):
    assert vllm.main(["/m"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["-tp", "3"], "must be divisible by tensor parallel size (3)"),
    (["--max-model-len", "8192"], "greater than the derived max_model_len"),
    (["--gpu-memory-utilization", "1.2"], "within (0, 1]"),
])
def test_startup_checks(tmp_path, argv, message):
    with pytest.raises(
        vllm.StartupError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        vllm.prepare(parse(str(model(tmp_path)), *argv))


def test_refuses_to_start_without_config_json(tmp_path):
    with pytest.raises(vllm.StartupError, match="No config.json"):
        vllm.prepare(parse(str(tmp_path)))


def test_binds_the_pod_ip_for_all_interfaces(monkeypatch):
    monkeypatch.setenv("SLMFLEET_POD_IP", "127.64.0.5")
    assert vllm.bind_host(None) == "127.64.0.5"
    assert vllm.bind_host("0.0.0.0") == "127.64.0.5"
    assert vllm.bind_host("127.0.0.9") == "127.0.0.9"


def test_latency_distribution_matches_mean_and_p95():
    b = vllm.Behaviour({}, "", latency_mean_ms=50, latency_p95_ms=80, error_rate=0, startup_seconds=0)
    rng = random.Random(7)
    samples = sorted(b.sample_latency_s(rng) * 1000 for _ in range(40000))
    assert statistics.fmean(samples) == pytest.approx(50, rel=0.03)
    assert samples[int(0.95 * len(samples))] == pytest.approx(80, rel=0.03)


def run_app(engine, scenario):
    async def go():
        async with TestClient(TestServer(vllm.make_app(engine))) as c:
            return await scenario(c)
    return asyncio.run(go())


def test_serves_standin_responses_errors_and_metrics(tmp_path):
    path = model(tmp_path, behaviour={"responses": [{"prompt": "2+2?", "completion": "4"}],
                                       "default_completion": "unsure", "error_rate": 0.0})
    engine = vllm.prepare(parse(str(path), "--served-model-name", "calc"))

    async def scenario(c):
        r = await c.post("/v1/chat/completions", json={"model": "calc", "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": " 2+2? "}]})
        chat = await r.json()
        r2 = await c.post("/v1/completions", json={"model": "calc", "prompt": "other"})
        comp = await r2.json()
        r3 = await c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        r4 = await c.post("/v1/completions", json={"model": "calc", "prompt": "one two", "max_tokens": 1})
        metrics = await (await c.get("/metrics")).text()
        return chat, comp, r3.status, await r3.json(), await r4.json(), metrics

    chat, comp, status, err, truncated, metrics = run_app(engine, scenario)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == "4"
    assert comp["choices"][0]["text"] == "unsure"
    assert status == 404 and err["type"] == "NotFoundError"
    assert truncated["choices"][0]["finish_reason"] == "stop"  # "unsure" is one word
    assert 'vllm:request_success_total{finished_reason="stop",model_name="calc"} 3.0' in metrics
    assert 'http_requests_total{handler="/v1/chat/completions",method="POST",status="4xx"} 1.0' in metrics
    for name in ("vllm:e2e_request_latency_seconds_bucket", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert name in metrics


def test_error_rate_one_always_fails(tmp_path):
    engine = vllm.prepare(parse(str(model(tmp_path, behaviour={"error_rate": 1.0}))))

    async def scenario(c):
        r = await c.post("/v1/completions", json={"model": str(tmp_path), "prompt": "x"})
        return r.status, await (await c.get("/metrics")).text()

    status, metrics = run_app(engine, scenario)
    assert status == 500
    assert 'status="5xx"' in metrics
