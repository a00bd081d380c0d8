"""Parsing vLLM's /metrics and what happened between two scrapes (requests, errors, p95 from buckets)."""

import asyncio
import json
import math

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import generate_latest

from e2e.standin import vllm
from slmfleet.evaluation.metrics import (
    MetricsParseError,
    ScrapeError,
    merge_buckets,
    metrics_url,
    parse_exposition,
    quantile_from_buckets,
    scrape,
    window_stats,
)


def test_parses_the_exposition_format():
    text = "\n".join([
        "# HELP http_requests_total Total number of requests.",
        "# TYPE http_requests_total counter",
        'http_requests_total{handler="/v1/completions",method="POST",status="2xx"} 12.0',
        'odd{path="C:\\\\dir",quote="say \\"hi\\"",nl="a\\nb",comma="x,y"} 1 1712345678000',
        'spaced { a = "1" , b="2", } 2.5',
        "plain 3",
        'inf_bucket{le="+Inf"} +Inf',
        "not_a_number NaN",
        'with_exemplar_bucket{le="0.5"} 7 # {trace_id="abc"} 0.4 1712345678.1',
        "# EOF",
    ])
    scrape_ = parse_exposition(text)
    assert scrape_.total("http_requests_total") == 12.0
    odd = scrape_.select("odd")[0]
    assert odd.label("path") == "C:\\dir" and odd.label("quote") == 'say "hi"' and odd.label("nl") == "a\nb"
    assert odd.label("comma") == "x,y" and odd.value == 1.0
    assert scrape_.select("spaced", {"a": "1", "b": "2"})[0].value == 2.5
    assert scrape_.total("plain") == 3.0 and scrape_.total("missing") is None
    assert math.isinf(scrape_.total("inf_bucket")) and math.isnan(scrape_.total("not_a_number"))
    assert scrape_.total("with_exemplar_bucket") == 7.0


@pytest.mark.parametrize("line, message", [
    ("{x=\"1\"} 2", "line 2: expected a metric name"),
    ('m{x="1" 2', "line 2: expected , or } after label 'x'"),
    ('m{x="1', "line 2: unterminated value of label 'x'"),
    ("m{1x=\"1\"} 2", "line 2: expected a label name"),
    ("m{x=1} 2", "line 2: expected =\"value\" after label 'x'"),
    ("m", "line 2: expected a value"),
    ("m 1 2 3", "line 2: expected a value"),
    ("m one", "line 2: 'one' is not a number"),
])
def test_malformed_lines_are_reported_with_their_number(line, message):
    with pytest.raises(MetricsParseError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_exposition("ok 1\n" + line)


def test_quantile_from_buckets_as_promql_does():
    buckets = [(0.1, 50.0), (0.2, 90.0), (0.4, 100.0), (math.inf, 100.0)]
    assert quantile_from_buckets(0.95, buckets) == pytest.approx(0.3)  # 0.2 + 0.2 * (95 - 90) / 10
    assert quantile_from_buckets(0.5, buckets) == pytest.approx(0.1)
    assert quantile_from_buckets(0.25, buckets) == pytest.approx(0.05)  # the first bucket starts at 0
    assert quantile_from_buckets(0.95, [(0.1, 0.0), (0.5, 2.0), (math.inf, 10.0)]) == 0.5  # in +Inf: last bound
    assert quantile_from_buckets(0.95, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert quantile_from_buckets(0.95, []) is None
    with pytest.raises(ValueError):
        quantile_from_buckets(1.5, buckets)


def engine(tmp_path, name="m"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8}))
    return vllm.prepare(vllm.build_parser().parse_args([str(tmp_path), "--served-model-name", name]))


def exposition(e) -> str:
    return generate_latest(e.registry).decode()


def serve_requests(e, latencies, statuses, handler="/v1/chat/completions"):
    """Record requests in the stand-in's own metrics, as its handlers do."""
    for latency in latencies:
        e.e2e.labels(**e.metric_labels).observe(latency)
        e.success.labels(finished_reason="stop", **e.metric_labels).inc()
    for status in statuses:
        e.http.labels(method="POST", status=status, handler=handler).inc()


def test_window_between_two_scrapes_of_the_standin(tmp_path):
    e = engine(tmp_path)
    serve_requests(e, [0.2] * 10, ["2xx"] * 10)
    e.http.labels(method="GET", status="2xx", handler="/v1/models").inc(5)  # not a generation request
    before = parse_exposition(exposition(e))
    # 100 answered requests: 90 under 0.3 s, 10 between 1.5 and 2 s; plus 5 failures and 2 bad requests.
    serve_requests(e, [0.1] * 90 + [1.8] * 10, ["2xx"] * 100 + ["5xx"] * 5, handler="/v1/completions")
    serve_requests(e, [], ["4xx"] * 2)
    after = parse_exposition(exposition(e))
    stats = window_stats(before, after, model="m")
    assert stats.requests == 107 and stats.errors == 5 and stats.client_errors == 2
    assert stats.successes == 100 and stats.latency_count == 100
    assert stats.error_rate == pytest.approx(5 / 107)
    assert stats.p95_latency_s == pytest.approx(1.5 + 0.5 * (95 - 90) / 10)  # in the (1.5, 2.0] bucket
    assert stats.reset is False
    # Another model's series are not this model's.
    other = window_stats(before, after, model="other")
    assert other.latency_count == 0 and other.p95_latency_s is None and other.successes == 0
    # Nothing happened: no requests, no error rate, no latency.
    idle = window_stats(after, after)
    assert (idle.requests, idle.error_rate, idle.p95_latency_s) == (0, None, None)


def test_a_restart_between_scrapes_counts_from_zero(tmp_path):
    old = engine(tmp_path / "old")
    new = engine(tmp_path / "new")
    serve_requests(old, [0.1] * 50, ["2xx"] * 50)
    serve_requests(new, [0.1] * 4, ["2xx"] * 3 + ["5xx"])
    stats = window_stats(parse_exposition(exposition(old)), parse_exposition(exposition(new)))
    assert stats.reset is True and stats.requests == 4 and stats.errors == 1 and stats.latency_count == 4


def test_without_the_http_counter_the_error_rate_is_unknown(tmp_path):
    e = engine(tmp_path)
    keep = lambda text: "\n".join(line for line in text.splitlines() if not line.startswith("http_requests"))  # noqa: E731
    before = parse_exposition(keep(exposition(e)))
    serve_requests(e, [0.1] * 3, ["2xx"] * 3)
    stats = window_stats(before, parse_exposition(keep(exposition(e))))
    assert stats.requests == 3 and stats.errors is None and stats.error_rate is None
    assert stats.to_dict()["successes"] == 3


def test_metrics_url():
    assert metrics_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://127.0.0.1:8000/custom") == "http://127.0.0.1:8000/custom"


def test_scrape_a_real_server(tmp_path):
    e = engine(tmp_path)
    serve_requests(e, [0.1], ["2xx"])

    async def broken(_):
        return web.Response(text="this is { not metrics")

    async def missing(_):
        return web.Response(status=503)

    async def go():
        app = vllm.make_app(e)
        app.router.add_get("/broken", broken)
        app.router.add_get("/missing", missing)
        async with TestServer(app, host="127.0.0.1") as server:
            base = str(server.make_url("")).rstrip("/")
            got = await scrape(base)
            errors = []
            for url in (base + "/broken", base + "/missing"):
                with pytest.raises(ScrapeError) as exc:
                    await scrape(url)
                errors.append(str(exc.value))
        with pytest.raises(ScrapeError) as exc:
            await scrape(base, timeout=2)  # the server is gone
        return got, errors, str(exc.value)

    got, (broken_err, missing_err), gone = asyncio.run(go())
    assert got.total("vllm:request_success_total", {"model_name": "m"}) == 1.0
    assert "line 1: expected a value" in broken_err and "HTTP 503" in missing_err
    assert "/metrics: ClientConnectorError" in gone


def test_merged_buckets_are_one_histogram_over_the_servers():
    inf = float("inf")
    fast = [(0.3, 9.0), (1.0, 10.0), (inf, 10.0)]
    slow = [(0.3, 0.0), (1.0, 2.0), (inf, 10.0)]
    assert merge_buckets(fast, slow) == [(0.3, 9.0), (1.0, 12.0), (inf, 20.0)]
    # the p95 of both together lies in the slow server's +Inf bucket, not in either alone
    assert quantile_from_buckets(0.95, merge_buckets(fast, slow)) == 1.0
    assert quantile_from_buckets(0.95, fast) < 1.0
    assert merge_buckets() == []


def test_window_stats_carry_the_window_latency_buckets():
    def exposition(count_03: int, count_inf: int) -> str:
        return "\n".join([
            f'vllm:e2e_request_latency_seconds_bucket{{le="0.3",model_name="m"}} {count_03}',
            f'vllm:e2e_request_latency_seconds_bucket{{le="+Inf",model_name="m"}} {count_inf}',
        ]) + "\n"
    stats = window_stats(parse_exposition(exposition(5, 6)), parse_exposition(exposition(7, 10)), model="m")
    assert stats.latency_buckets == ((0.3, 2.0), (float("inf"), 4.0))


def test_a_models_engines_are_summed():
    """vLLM labels its series by engine as well as model_name (data parallelism runs several engines in one
    server): requests, successes and the latency histogram of a model are the sum over its engines, the
    buckets summed by `le` before the quantile is taken; another model's engines are left out."""
    bounds = ("0.3", "0.5", "1.0", "+Inf")

    def page(engines: dict[tuple[str, str], tuple[list[int], int]], http: dict[str, int]) -> str:
        lines = ["# TYPE vllm:e2e_request_latency_seconds histogram"]
        for (model, engine_), (buckets, _) in engines.items():
            lines += [f'vllm:e2e_request_latency_seconds_bucket{{engine="{engine_}",le="{le}",model_name="{model}"}} {n}'
                      for le, n in zip(bounds, buckets, strict=True)]
        lines.append("# TYPE vllm:request_success_total counter")
        lines += [f'vllm:request_success_total{{engine="{engine_}",finished_reason="stop",model_name="{model}"}} {n}'
                  for (model, engine_), (_, n) in engines.items()]
        lines.append("# TYPE http_requests_total counter")
        lines += [f'http_requests_total{{handler="/v1/completions",method="POST",status="{status}"}} {n}'
                  for status, n in http.items()]
        return "\n".join(lines) + "\n"

    before = parse_exposition(page({("m", "0"): ([10, 10, 10, 10], 10), ("m", "1"): ([0, 0, 0, 0], 0),
                                    ("other", "0"): ([0, 0, 0, 0], 0)}, {"2xx": 10}))
    # In the window: engine 0 answers 90 requests under 0.3 s; engine 1 answers 10 between 0.5 and 1 s and
    # fails 2 (5xx); the other model's engine answers 50 slow ones, which are not m's.
    after = parse_exposition(page({("m", "0"): ([100, 100, 100, 100], 100), ("m", "1"): ([0, 0, 10, 10], 10),
                                   ("other", "0"): ([0, 0, 0, 50], 50)}, {"2xx": 160, "5xx": 2}))
    stats = window_stats(before, after, model="m")
    assert stats.successes == 100 and stats.latency_count == 100
    assert stats.latency_buckets == ((0.3, 90.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0))
    # rank 95 of 100 lies in engine 1's (0.5, 1.0] bucket: the p95 of neither engine alone
    assert stats.p95_latency_s == pytest.approx(0.5 + 0.5 * (95 - 90) / 10)
    assert stats.requests == 152 and stats.errors == 2 and stats.error_rate == pytest.approx(2 / 152)
    assert stats.reset is False
    # One engine alone is still selectable; the whole server is every model's engines.
    assert after.total("vllm:request_success_total", {"model_name": "m", "engine": "1"}) == 10.0
    assert window_stats(before, after).successes == 150
