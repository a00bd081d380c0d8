"""Evaluation reads are bounded (issue 13): answers are read with a byte cap whether or not they
have a Content-Length, max_tokens is bounded, a run keeps scores and statistics but never the
answers, and /metrics scrapes stop at their cap. Loopback aiohttp servers on 127.0.0.1 stream
endless bodies without a Content-Length and count what they managed to send."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from slmfleet.api.modelrollout import Evaluation
from slmfleet.evaluation import metrics as metrics_mod
from slmfleet.evaluation import parse_cases
from slmfleet.evaluation.metrics import MAX_SCRAPE_BYTES, MetricsParseError, ScrapeError, parse_exposition, scrape
from slmfleet.evaluation.runner import (
    ANSWER_BASE_BYTES,
    ANSWER_BYTES_PER_TOKEN,
    MAX_ANSWER_BYTES,
    MAX_DETAIL,
    MAX_TOKENS_LIMIT,
    MODEL_LIST_BYTES,
    Answer,
    CaseResult,
    Client,
    Endpoint,
    EndpointError,
    SideResult,
    answer_byte_limit,
    evaluate,
    evaluate_paired,
    list_models,
)

MARKER = "ENDLESS-MARKER-51c2"
CHUNK = (MARKER.encode() * 4096)[:64 * 1024]


class Endless:
    """Handlers that stream forever (chunked, no Content-Length), counting the bytes sent."""

    def __init__(self):
        self.sent = 0
        self.requests = 0

    async def stream(self, request: web.Request, status: int = 200, first: bytes = b"") -> web.StreamResponse:
        self.requests += 1
        resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            if first:
                await resp.write(first)
            while True:
                await resp.write(CHUNK)
                self.sent += len(CHUNK)
        except (ConnectionResetError, ConnectionError, RuntimeError):
            pass
        return resp

    def app(self) -> web.Application:
        async def completions(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            if body.get("prompt") == "fail":
                return await self.stream(request, status=500, first=b'{"message": "')
            if body.get("prompt") == "declared":  # a Content-Length over the cap: refused unread
                return web.Response(body=b"x" * (MAX_ANSWER_BYTES + 1), content_type="application/json")
            if body.get("prompt") == "ok":
                return web.json_response({"choices": [{"text": "ok " + MARKER}]})
            return await self.stream(request, first=b'{"choices": [{"text": "')

        async def models(request: web.Request) -> web.StreamResponse:
            return await self.stream(request, first=b'{"data": [')

        async def metrics(request: web.Request) -> web.StreamResponse:
            return await self.stream(request)

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/metrics", metrics)
        return app


def with_server(scenario):
    endless = Endless()

    async def go():
        async with TestServer(endless.app(), host="127.0.0.1") as server:
            t0 = time.monotonic()
            result = await scenario(str(server.make_url("")).rstrip("/"))
            return result, time.monotonic() - t0

    result, seconds = asyncio.run(go())
    return result, seconds, endless


def test_an_endless_answer_is_cut_at_the_cap_and_is_a_protocol_error():
    cases = parse_cases([{"id": "endless", "prompt": "go on", "expected": "x"},
                         {"id": "ok", "prompt": "ok", "expected": "ok"}])
    run, seconds, endless = with_server(
        lambda url: evaluate(cases, Endpoint(url, "m"), ["contains"], max_tokens=16, timeout=60))
    by_id = dict(run.results)
    answer = by_id["endless"].answer
    limit = answer_byte_limit(16)
    assert limit == ANSWER_BASE_BYTES + 16 * ANSWER_BYTES_PER_TOKEN
    assert answer.error == "protocol" and answer.detail == f"the answer is larger than {limit} bytes"
    assert by_id["endless"].score == 0.0 and by_id["ok"].score == 1.0
    assert seconds < 30  # the read stopped; it did not run into the 60 s timeout
    assert MARKER not in json.dumps(run.to_dict(cases=True))  # neither the endless nor the good answer is kept


def test_a_declared_content_length_over_the_cap_is_refused():
    cases = parse_cases([{"prompt": "declared", "expected": "x"}])
    run, _, _ = with_server(lambda url: evaluate(cases, Endpoint(url, "m"), ["contains"], max_tokens=None))
    answer = run.results[0][1].answer
    assert answer.error == "protocol" and str(MAX_ANSWER_BYTES) in answer.detail


def test_an_endless_error_body_is_cut_and_its_detail_bounded():
    cases = parse_cases([{"prompt": "fail", "expected": "x"}])
    run, seconds, _ = with_server(lambda url: evaluate(cases, Endpoint(url, "m"), ["contains"], timeout=60))
    answer = run.results[0][1].answer
    assert answer.error == "http" and answer.status == 500
    assert len(answer.detail) <= MAX_DETAIL and seconds < 30


def test_the_model_list_is_read_with_a_cap():
    async def scenario(url):
        with pytest.raises(EndpointError) as err:
            await list_models(url, timeout=60)
        return str(err.value)

    message, seconds, _ = with_server(scenario)
    assert f"larger than {MODEL_LIST_BYTES} bytes" in message and MARKER not in message and seconds < 30


def test_an_endless_metrics_page_stops_at_the_cap():
    async def scenario(url):
        with pytest.raises(ScrapeError) as err:
            await scrape(url, timeout=60)
        small = None
        try:
            await scrape(url, timeout=60, max_bytes=1000)
        except ScrapeError as exc:
            small = str(exc)
        return str(err.value), small

    (message, small), seconds, endless = with_server(scenario)
    assert f"larger than {MAX_SCRAPE_BYTES} bytes" in message and MARKER not in message
    assert "larger than 1000 bytes" in small
    assert seconds < 30


def test_a_parse_keeps_at_most_max_samples(monkeypatch):
    monkeypatch.setattr(metrics_mod, "MAX_SAMPLES", 10)
    assert len(parse_exposition("a 1\n" * 10).samples) == 10
    with pytest.raises(MetricsParseError, match="more than 10 samples"):
        parse_exposition("a 1\n" * 11)


def test_max_tokens_is_bounded_like_the_api():
    assert Evaluation.model_json_schema()["properties"]["maxTokens"]["maximum"] == MAX_TOKENS_LIMIT
    for bad in (0, MAX_TOKENS_LIMIT + 1, True, 2.5):
        with pytest.raises(ValueError, match="max_tokens"):
            Client(None, max_tokens=bad)  # type: ignore[arg-type]
    assert Client(None, max_tokens=MAX_TOKENS_LIMIT).max_answer_bytes == answer_byte_limit(MAX_TOKENS_LIMIT)
    assert answer_byte_limit(MAX_TOKENS_LIMIT) <= MAX_ANSWER_BYTES and answer_byte_limit(None) == MAX_ANSWER_BYTES


def test_a_run_keeps_scores_not_answers():
    cases = parse_cases([{"id": f"c{i}", "prompt": "ok", "expected": "ok"} for i in range(20)])

    async def scenario(url):
        return await evaluate_paired(cases, Endpoint(url, "a"), Endpoint(url, "b"), ["contains"], batch_size=7)

    run, _, _ = with_server(scenario)
    assert run.n == 20 and run.stable.score == run.candidate.score == 1.0
    for r in run.results:
        for side in (r.stable, r.candidate):
            assert side.answer.text is None and side.answer.latency_s is not None
    assert MARKER not in repr(run.results)
    # Per case: a few slotted objects (no per-instance __dict__), the scores and the statistics' inputs.
    for cls in (Answer, SideResult, CaseResult):
        assert not hasattr(cls(*([None] * len(cls.__slots__))), "__dict__")
