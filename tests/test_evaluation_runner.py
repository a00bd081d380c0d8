"""The runner end to end against real local servers on 127.0.0.1: vLLM stand-in processes with
different standin.json answers, and a small aiohttp server that records what it is sent."""

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from slmfleet.evaluation import (
    DatasetError,
    Endpoint,
    EndpointError,
    evaluate,
    evaluate_paired,
    iter_paired_batches,
    list_models,
    parse_cases,
    percentile,
    scrape,
    window_stats,
)
from slmfleet.evaluation.runner import batch_ends
from tests.standin_servers import free_port, standins

REPO = Path(__file__).resolve().parents[1]
MODEL = "qwen-test"

GOOD = {"responses": [{"prompt": "2+2?", "completion": "4"},
                      {"prompt": "Capital of France?", "completion": "Paris"},
                      {"prompt": "The sky is", "completion": "blue"},
                      {"prompt": "Classify: great movie", "completion": '{"label": "positive"}'},
                      {"prompt": "Spell it out", "completion": "one two three four"}],
        "default_completion": "I do not know", "latency_ms": {"mean": 20, "p95": 20}}
BAD = {"responses": [{"prompt": "2+2?", "completion": "5"},
                     {"prompt": "Capital of France?", "completion": "Paris"},
                     {"prompt": "The sky is", "completion": "green"},
                     {"prompt": "Classify: great movie", "completion": '{"label": "negative"}'}],
       "default_completion": "no idea", "latency_ms": {"mean": 80, "p95": 80}}
FAILING = {"default_completion": "x", "error_rate": 1.0}
SLOW = {"default_completion": "late", "latency_ms": {"mean": 2000, "p95": 2000}}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with standins(tmp_path_factory.mktemp("standins"),
                  {"good": GOOD, "bad": BAD, "failing": FAILING, "slow": SLOW}, MODEL) as urls:
        yield urls


def ep(servers, name, model=MODEL):
    return Endpoint(servers[name], model)


CASES = [
    {"id": "add", "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"}],
     "expected": "4"},
    {"id": "capital", "messages": [{"role": "user", "content": "Capital of France?"}], "expected": "paris"},
    {"id": "sky", "prompt": "The sky is", "expected": "blue"},
    {"id": "sentiment", "messages": [{"role": "user", "content": "Classify: great movie"}],
     "expected": {"label": "positive"},
     "scorers": ["json_field:field=label", {"type": "json_schema", "schema": {"type": "object", "required": ["label"]}}]},
]
SCORERS = ["exact_match", "exact_match:lowercase=true"]


def test_paired_scores_and_latency(servers):
    cases = parse_cases(CASES)
    run = asyncio.run(evaluate_paired(cases, ep(servers, "good"), ep(servers, "bad"), SCORERS,
                                      concurrency=2, timeout=10, keep_text=True))
    assert run.n == run.planned == 4 and run.complete
    by_id = {r.case_id: r for r in run.results}
    # The first scorer decides: "Paris" vs "paris" fails exact_match but passes the lowercase one.
    assert by_id["capital"].stable.scores == {"exact_match": 0.0, "exact_match_2": 1.0}
    assert by_id["capital"].stable.score == 0.0 and by_id["capital"].difference == 0.0
    assert by_id["add"].stable.answer.text == "4" and by_id["add"].candidate.answer.text == "5"
    assert by_id["sky"].stable.score == 1.0 and by_id["sky"].candidate.score == 0.0  # a prompt case
    # The case's own scorers: the field is wrong for the candidate, the schema holds for both.
    assert by_id["sentiment"].stable.scores == {"json_field": 1.0, "json_schema": 1.0}
    assert by_id["sentiment"].candidate.scores == {"json_field": 0.0, "json_schema": 1.0}
    assert run.stable_scores() == [1.0, 0.0, 1.0, 1.0]
    assert run.candidate_scores() == [0.0, 0.0, 0.0, 0.0]
    assert run.differences() == [-1.0, 0.0, -1.0, -1.0] and run.mean_difference == -0.75
    stable, candidate = run.stable, run.candidate
    assert stable.score == 0.75 and candidate.score == 0.0
    assert stable.scores["exact_match_2"] == 1.0 and stable.scores["json_schema"] == 1.0
    assert stable.error_rate == candidate.error_rate == 0.0
    # The stand-ins sleep 20 ms and 80 ms before answering.
    assert stable.p95_latency_s >= 0.02 and candidate.p95_latency_s >= 0.08
    assert all(r.candidate.answer.attempts == 1 and r.candidate.answer.status == 200 for r in run.results)
    doc = run.to_dict(cases=True)
    assert doc["difference"] == -0.75 and doc["cases"][0]["stable"]["text"] == "4"
    json.dumps(doc)
    # By default (the operator's runs) the answers are scored, then dropped: the same scores, no texts.
    lean = asyncio.run(evaluate_paired(cases, ep(servers, "good"), ep(servers, "bad"), SCORERS,
                                       concurrency=2, timeout=10))
    assert lean.differences() == run.differences() and lean.stable.scores == stable.scores
    assert all(side.answer.text is None for r in lean.results for side in (r.stable, r.candidate))


def test_single_endpoint_and_max_tokens(servers):
    cases = parse_cases([{"id": "long", "prompt": "Spell it out", "expected": "one two"}])
    run = asyncio.run(evaluate(cases, ep(servers, "good"), ["exact_match"], max_tokens=2, keep_text=True))
    (cid, result), = run.results
    assert result.answer.text == "one two" and result.score == 1.0  # max_tokens reached the server
    run = asyncio.run(evaluate(cases, ep(servers, "good"), ["exact_match"], max_tokens=None, keep_text=True))
    assert run.results[0][1].answer.text == "one two three four"
    assert run.summary.n == 1 and run.to_dict(cases=True)["cases"][0]["id"] == "long"


def test_server_errors_count_and_are_not_retried(servers):
    cases = parse_cases([{"prompt": f"q{i}", "expected": "x"} for i in range(6)])
    run = asyncio.run(evaluate_paired(cases, ep(servers, "good"), ep(servers, "failing"), ["exact_match"]))
    cand = run.candidate
    assert cand.error_rate == 1.0 and cand.errors == 6 and cand.errors_by_kind == {"http": 6}
    assert cand.score == 0.0 and cand.p95_latency_s is None
    answer = run.results[0].candidate.answer
    assert answer.status == 500 and answer.attempts == 1 and "stand-in injected error" in answer.detail
    assert answer.describe_error().startswith("HTTP 500: ")
    assert run.stable.error_rate == 0.0


def test_a_wrong_model_is_a_4xx_and_not_retried(servers):
    cases = parse_cases([{"prompt": "The sky is", "expected": "blue"}])
    run = asyncio.run(evaluate(cases, ep(servers, "good", model="nope"), ["exact_match"]))
    answer = run.results[0][1].answer
    assert (answer.error, answer.status, answer.attempts) == ("http", 404, 1)
    assert "does not exist" in answer.detail


def test_timeouts(servers):
    cases = parse_cases([{"prompt": "p1", "expected": "late"}, {"prompt": "p2", "expected": "late"}])
    run = asyncio.run(evaluate_paired(cases, ep(servers, "good"), ep(servers, "slow"), ["exact_match"], timeout=0.3))
    assert run.candidate.errors_by_kind == {"timeout": 2} and run.candidate.error_rate == 1.0
    answer = run.results[0].candidate.answer
    assert answer.attempts == 1 and answer.latency_s is None and "0.3 s" in answer.detail
    assert run.stable.error_rate == 0.0


def test_connection_errors_are_retried_once(servers):
    cases = parse_cases([{"prompt": "The sky is", "expected": "blue"}])
    closed = Endpoint(f"http://127.0.0.1:{free_port()}", MODEL)
    run = asyncio.run(evaluate_paired(cases, ep(servers, "good"), closed, ["exact_match"], timeout=2))
    answer = run.results[0].candidate.answer
    assert (answer.error, answer.attempts) == ("connection", 2) and "ClientConnectorError" in answer.detail
    run = asyncio.run(evaluate(cases, closed, ["exact_match"], connection_retries=0, timeout=2))
    assert run.results[0][1].answer.attempts == 1


def test_batches_give_partial_results(servers):
    cases = parse_cases([{"id": f"c{i}", "prompt": "The sky is", "expected": "blue"} for i in range(7)])

    async def first_two_batches():
        seen = []
        async with contextlib.aclosing(iter_paired_batches(
                cases, ep(servers, "good"), ep(servers, "bad"), ["exact_match"], batch_size=3)) as batches:
            async for run in batches:
                seen.append(run)
                if len(seen) == 2:
                    break
        return seen

    first, second = asyncio.run(first_two_batches())
    assert (first.n, second.n, second.planned, second.complete) == (3, 6, 7, False)
    assert [r.case_id for r in second.results] == [f"c{i}" for i in range(6)]
    assert second.differences() == [-1.0] * 6

    async def all_batches():
        return [run.n async for run in iter_paired_batches(cases, ep(servers, "good"), ep(servers, "bad"),
                                                           ["exact_match"], batch_size=3)]

    assert asyncio.run(all_batches()) == [3, 6, 7]

    stops = []

    def stop_when(run):
        stops.append(run.n)
        return run.n >= 4

    run = asyncio.run(evaluate_paired(cases, ep(servers, "good"), ep(servers, "bad"), ["exact_match"],
                                      batch_size=2, stop_when=stop_when))
    assert stops == [2, 4] and run.n == 4 and not run.complete
    run = asyncio.run(evaluate_paired(cases, ep(servers, "good"), ep(servers, "bad"), ["exact_match"],
                                      batch_size=2, stop_when=lambda run: False))
    assert run.n == 7 and run.complete
    # Batches ending at a sequential plan's looks (cumulative counts).
    stops.clear()
    run = asyncio.run(evaluate_paired(cases, ep(servers, "good"), ep(servers, "bad"), ["exact_match"],
                                      looks=[2, 5, 7], stop_when=lambda run: stops.append(run.n) or False))
    assert stops == [2, 5] and run.n == 7 and run.complete  # stop_when is not asked after the last batch


def test_batch_ends():
    assert batch_ends(7, batch_size=3) == [3, 6, 7]
    assert batch_ends(6, batch_size=3) == [3, 6]
    assert batch_ends(7) == [7] and batch_ends(0, batch_size=3) == []
    assert batch_ends(300, looks=[75, 150, 225, 300]) == [75, 150, 225, 300]
    assert batch_ends(200, looks=[75, 150, 225, 300]) == [75, 150, 200]
    assert batch_ends(400, looks=[75, 150]) == [75, 150, 400]
    for kwargs in ({"batch_size": 0}, {"batch_size": True}, {"looks": [5, 5]}, {"looks": [0, 3]},
                   {"batch_size": 2, "looks": [3]}):
        with pytest.raises(ValueError):
            batch_ends(10, **kwargs)


def test_metrics_window_around_an_evaluation(servers):
    cases = parse_cases([{"prompt": f"q{i}", "expected": "x"} for i in range(5)])

    async def go():
        before = [await scrape(servers[n]) for n in ("good", "failing")]
        await evaluate_paired(cases, ep(servers, "good"), ep(servers, "failing"), ["exact_match"])
        after = [await scrape(servers[n]) for n in ("good", "failing")]
        return [window_stats(b, a, model=MODEL) for b, a in zip(before, after, strict=True)]

    good, failing = asyncio.run(go())
    assert (good.requests, good.errors, good.latency_count) == (5, 0, 5)
    assert good.p95_latency_s is not None and good.p95_latency_s <= 0.3  # all in the first bucket
    assert (failing.requests, failing.errors, failing.error_rate) == (5, 5, 1.0)
    assert failing.p95_latency_s is None


def test_list_models(servers):
    assert asyncio.run(list_models(servers["good"])) == [MODEL]
    assert asyncio.run(list_models(servers["good"] + "/v1/")) == [MODEL]
    with pytest.raises(EndpointError, match="ClientConnectorError"):
        asyncio.run(list_models(f"http://127.0.0.1:{free_port()}", timeout=2))


def test_bad_cases_fail_before_any_request():
    nowhere = Endpoint(f"http://127.0.0.1:{free_port()}", MODEL)
    cases = parse_cases([{"id": "a", "prompt": "p", "expected": "x"}, {"id": "b", "prompt": "p"}])
    with pytest.raises(DatasetError, match="case 'b': exact_match: exact_match needs an expected answer"):
        asyncio.run(evaluate_paired(cases, nowhere, nowhere, ["exact_match"]))
    with pytest.raises(DatasetError, match="case 'a': no scorers"):
        asyncio.run(evaluate(cases, nowhere, None))
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(evaluate(cases, nowhere, ["contains"], concurrency=0))
    with pytest.raises(ValueError, match="unknown scorer type"):
        asyncio.run(evaluate(cases, nowhere, ["nope"]))


# --- what goes over the wire, concurrency, a stale connection ----------------------------------------

class Recorder:
    """An OpenAI-compatible server that records requests and in-flight counts; the first request
    with prompt "drop" loses its connection."""

    def __init__(self, delay: float = 0.05):
        self.delay = delay
        self.bodies: list[tuple[str, dict]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.dropped = False

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.bodies.append((request.path, body))
            if body.get("prompt") == "drop" and not self.dropped:
                self.dropped = True
                request.transport.close()
                return web.Response()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.in_flight -= 1
            if request.path == "/v1/completions":
                return web.json_response({"choices": [{"text": "ok"}]})
            if body["messages"][-1]["content"] == "garbage":
                return web.Response(text="<html>not json</html>")
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": None}}]})

        app = web.Application()
        app.router.add_post("/v1/completions", handle)
        app.router.add_post("/v1/chat/completions", handle)
        return app


def run_with_recorder(recorder, scenario):
    async def go():
        async with TestServer(recorder.app(), host="127.0.0.1") as server:
            return await scenario(Endpoint(str(server.make_url("")), "m", api_key="sk-test"))
    return asyncio.run(go())


def test_request_bodies_and_concurrency_bound():
    recorder = Recorder()
    cases = parse_cases([{"prompt": f"p{i}", "expected": "ok"} for i in range(12)]
                        + [{"messages": [{"role": "user", "content": "hi"}], "expected": ""}])
    run = run_with_recorder(recorder, lambda e: evaluate(cases, e, ["exact_match"], concurrency=3, max_tokens=7))
    assert recorder.max_in_flight == 3  # bounded, and the bound is used
    path, body = recorder.bodies[0]
    assert path == "/v1/completions" and body == {"model": "m", "temperature": 0, "prompt": body["prompt"], "max_tokens": 7}
    chat = [b for p, b in recorder.bodies if p == "/v1/chat/completions"]
    assert chat == [{"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}]
    assert run.summary.score == 1.0  # a null content is the empty answer
    assert "sk-test" not in repr(Endpoint("http://x", "m", api_key="sk-test"))


def test_both_sides_get_their_own_concurrency():
    recorder = Recorder()
    cases = parse_cases([{"prompt": f"p{i}", "expected": "ok"} for i in range(8)])
    # Two endpoints on one server (different model names): 2 + 2 in flight at most.
    run_with_recorder(recorder, lambda e: evaluate_paired(cases, e, Endpoint(e.base_url, "m2"), ["exact_match"],
                                                          concurrency=2))
    assert recorder.max_in_flight == 4
    assert {b["model"] for _, b in recorder.bodies} == {"m", "m2"}


def test_a_dropped_connection_is_retried_and_garbage_is_a_protocol_error():
    recorder = Recorder(delay=0)
    cases = parse_cases([{"prompt": "drop", "expected": "ok"},
                         {"messages": [{"role": "user", "content": "garbage"}], "expected": "x"}])
    run = run_with_recorder(recorder, lambda e: evaluate(cases, e, ["exact_match"], concurrency=1))
    dropped, garbage = (r for _, r in run.results)
    assert dropped.answer.ok and dropped.answer.attempts == 2 and dropped.score == 1.0
    assert garbage.answer.error == "protocol" and "not a completion" in garbage.answer.detail
    assert run.summary.errors_by_kind == {"protocol": 1}


def test_percentile_is_nearest_rank():
    assert percentile([], 0.95) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile(range(1, 101), 0.95) == 95
    assert percentile(range(1, 21), 0.95) == 19
    assert percentile([5, 1, 4, 2, 3], 0.5) == 3
