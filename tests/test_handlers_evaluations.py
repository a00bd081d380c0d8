"""Background evaluations and the live metrics watch against real vLLM stand-in processes on
127.0.0.1 (tests/standin_servers.py)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from slmfleet.api.config import S3EndpointRule
from slmfleet.api.modelrollout import Evaluation, EvaluationResult, Thresholds
from slmfleet.controller.evaluations import (
    EvaluationOutcome,
    EvaluationRequest,
    Evaluations,
    LiveWatch,
    load_cases,
    run_evaluation,
)
from slmfleet.evaluation import DatasetError, Endpoint, evaluate, parse_cases, parse_exposition
from slmfleet.evaluation.stats import METHOD
from slmfleet.k8s.client import SecretObject
from tests.standin_servers import free_port, standins

MODEL = "qwen-test"
N_CASES = 80
CASES = [{"id": f"c{i}", "prompt": f"q{i}?", "expected": f"a{i}"} for i in range(N_CASES)]
RIGHT = [{"prompt": c["prompt"], "completion": c["expected"]} for c in CASES]
HALF = [{"prompt": c["prompt"], "completion": c["expected"] if i % 2 else "no idea"} for i, c in enumerate(CASES)]
FAST = {"mean": 5, "p95": 8}

BEHAVIOURS = {
    "stable": {"responses": RIGHT, "default_completion": "?", "latency_ms": FAST},
    "equal": {"responses": RIGHT, "default_completion": "?", "latency_ms": FAST},
    "half": {"responses": HALF, "default_completion": "?", "latency_ms": FAST},
    # answers like the stable but slowly: the stand-in's latency histogram has vLLM's buckets
    # (0.3, 0.5, 0.8, 1.0, ...), so "slow" must be well above 0.3 s to show in live metrics.
    "slow": {"responses": RIGHT, "default_completion": "?", "latency_ms": {"mean": 600, "p95": 800}},
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with standins(tmp_path_factory.mktemp("standins"), BEHAVIOURS, MODEL) as urls:
        yield urls


def evaluation(**overrides) -> Evaluation:
    spec = {
        "dataset": {"inline": CASES},
        "scorers": [{"type": "exactMatch"}, {"type": "contains", "normalize": ["lowercase"]}],
        "thresholds": {"margin": 0.1},
        "sampleSize": 60,
        "concurrency": 16,
        "requestTimeoutSeconds": 10,
    }
    spec.update(overrides)
    return Evaluation.model_validate(spec)


def request(servers, candidate: str, *, stable_url: str | None = None, id: str = "rev-b/step-0",
            spec: Evaluation | None = None) -> EvaluationRequest:
    spec = spec or evaluation()
    return EvaluationRequest(
        id=id, namespace="ns", rollout="r", rollout_uid="uid-1", step=0, evaluation=spec,
        sample_size=spec.sample_size, stable=Endpoint(stable_url or servers["stable"], MODEL),
        candidate=Endpoint(servers[candidate], MODEL), stable_revision="rev-a", candidate_revision="rev-b",
    )


def run(req: EvaluationRequest) -> EvaluationOutcome:
    async def go():
        cases = await load_cases(None, req)  # inline: no API calls
        return await run_evaluation(req, cases)

    return asyncio.run(go())


# --- evaluations ------------------------------------------------------------------------------------


def test_equal_candidate_passes_early_with_a_valid_result(servers):
    outcome = run(request(servers, "equal"))
    assert outcome.verdict == "pass", outcome.reason
    result = EvaluationResult.model_validate(outcome.result)
    assert result.verdict == "Pass" and result.step == 0 and result.method == METHOD
    assert result.planned == 60 and result.n < 60  # stopped at an interim look
    assert result.stable_score == result.candidate_score == "1.0000" and result.difference == "0.0000"
    assert float(result.ci_low) > -0.1
    assert result.stable_error_rate == result.candidate_error_rate == "0.0000"
    assert float(result.candidate_p95_latency_seconds) < 1
    assert "non-inferior" in result.reason
    assert outcome.scores == {"stable": {"exact_match": 1.0, "contains": 1.0},
                              "candidate": {"exact_match": 1.0, "contains": 1.0}}
    # the wire form is camelCase
    assert {"stableScore", "ciLow", "ciHigh", "candidateP95LatencySeconds"} <= set(outcome.result)


def test_worse_candidate_fails(servers):
    outcome = run(request(servers, "half"))
    assert outcome.verdict == "fail"
    assert "inferior" in outcome.reason or "futility" in outcome.reason
    result = EvaluationResult.model_validate(outcome.result)
    assert result.verdict == "Fail" and result.n < result.planned
    assert float(result.difference) < -0.3
    assert outcome.scores["candidate"]["exact_match"] < outcome.scores["stable"]["exact_match"]


def test_slow_candidate_fails_on_p95_latency(servers):
    spec = evaluation(thresholds={"margin": 0.1, "maxP95LatencySeconds": 0.4}, sampleSize=1000,
                      dataset={"inline": CASES[:40]}, concurrency=24)
    outcome = run(request(servers, "slow", spec=spec))
    assert outcome.verdict == "fail"
    assert "p95 latency" in outcome.reason
    result = EvaluationResult.model_validate(outcome.result)
    assert result.planned == 40  # the dataset is smaller than the sample size
    assert result.difference == "0.0000"  # the answers were right
    assert float(result.candidate_p95_latency_seconds) > 0.4


def test_unreachable_stable_is_an_error_not_a_failure(servers):
    closed = f"http://127.0.0.1:{free_port()}"
    outcome = run(request(servers, "equal", stable_url=closed))
    assert outcome.verdict == "error"
    assert outcome.result is None and outcome.scores == {}
    assert "stable" in outcome.reason and "connection" in outcome.reason


def test_the_same_request_samples_the_same_cases(servers):
    req = request(servers, "equal")
    first, second = run(req), run(req)
    same = ("n", "planned", "stableScore", "candidateScore", "ciLow", "ciHigh", "verdict")
    assert [first.result[k] for k in same] == [second.result[k] for k in same]


def test_ensure_runs_once_calls_on_done_once_and_keeps_the_outcome(servers):
    done: list[tuple[EvaluationRequest, EvaluationOutcome]] = []
    loads = []

    async def loader(req):
        loads.append(req.id)
        return await load_cases(None, req)

    async def go():
        evals = Evaluations(loader, lambda req, out: done.append((req, out)))
        req = request(servers, "equal")
        evals.ensure(req)
        evals.ensure(req)
        assert evals.running(req.id) and evals.outcome(req.id) is None
        while evals.running(req.id):
            await asyncio.sleep(0.02)
        evals.ensure(req)  # has an outcome: not started again
        assert not evals.running(req.id)
        await evals.close()
        return evals, req

    evals, req = asyncio.run(go())
    assert loads == [req.id]
    assert len(done) == 1 and done[0][0] is req and done[0][1] is evals.outcome(req.id)
    assert done[0][1].verdict == "pass"


def test_errors_are_outcomes_and_retried_after_a_while(servers):
    done = []

    async def broken(req):
        raise DatasetError("ConfigMap ns/cases: cannot read (Not Found (HTTP 404))")

    async def go(retry_after):
        evals = Evaluations(broken, lambda req, out: done.append(out), retry_errors_after=retry_after)
        req = request(servers, "equal")
        evals.ensure(req)
        while evals.running(req.id):
            await asyncio.sleep(0.01)
        first = evals.outcome(req.id)
        evals.ensure(req)
        restarted = evals.running(req.id)
        await evals.close()
        return first, restarted

    first, restarted = asyncio.run(go(60.0))
    assert first.verdict == "error" and "Not Found" in first.reason and first.result is None
    assert not restarted
    _, restarted = asyncio.run(go(0.0))
    assert restarted


def test_exceptions_in_the_task_become_error_outcomes(servers):
    done = []

    async def buggy(req):
        raise RuntimeError("boom")

    async def go():
        evals = Evaluations(buggy, lambda req, out: done.append(out))
        req = request(servers, "equal")
        evals.ensure(req)
        while evals.running(req.id):
            await asyncio.sleep(0.01)
        return evals.outcome(req.id)

    outcome = asyncio.run(go())
    assert outcome.verdict == "error" and "RuntimeError: boom" in outcome.reason
    assert done == [outcome]


def test_forget_cancels_running_tasks_and_drops_outcomes(servers):
    done = []

    async def go():
        gate = asyncio.Event()

        async def slow_loader(req):
            gate.set()
            await asyncio.sleep(30)
            return []

        evals = Evaluations(slow_loader, lambda req, out: done.append(out))
        req = request(servers, "equal", id="rev-b/step-2")
        evals.ensure(req)
        await gate.wait()
        evals.forget(lambda i: i != req.id)
        await asyncio.sleep(0.05)
        assert not evals.running(req.id) and evals.outcome(req.id) is None
        # a kept outcome stays, a rejected one goes
        evals._outcomes["keep"] = EvaluationOutcome("keep", "pass", "", {}, {}, 0.0)
        evals._outcomes["drop"] = EvaluationOutcome("drop", "pass", "", {}, {}, 0.0)
        evals.forget(lambda i: i == "keep")
        assert evals.outcome("keep") is not None and evals.outcome("drop") is None
        await evals.close()

    asyncio.run(go())
    assert done == []  # a cancelled evaluation reports nothing


# --- load_cases -------------------------------------------------------------------------------------


class FakeClient:
    """Secrets are labelled as S3 credentials unless `labels` says otherwise."""

    def __init__(self, config_maps=None, secrets=None, labels=None, annotations=None):
        self.config_maps = config_maps or {}
        self.secrets = secrets or {}
        self.labels = {"slmfleet.io/s3-credentials": "true"} if labels is None else labels
        self.annotations = annotations or {}

    async def read_config_map(self, namespace, name):
        try:
            return self.config_maps[(namespace, name)]
        except KeyError:
            raise LookupError("Not Found") from None

    async def read_secret_object(self, namespace, name):
        return SecretObject(self.secrets[(namespace, name)], dict(self.labels), dict(self.annotations))


def test_load_cases_inline(servers):
    cases = asyncio.run(load_cases(FakeClient(), request(servers, "equal")))
    assert len(cases) == N_CASES and cases[0].id == "c0" and cases[0].prompt == "q0?" and cases[0].expected == "a0"


def test_load_cases_config_map(servers):
    jsonl = "\n".join(json.dumps(c) for c in CASES[:12])
    spec = evaluation(dataset={"configMap": {"name": "cases", "key": "eval.jsonl"}})
    req = request(servers, "equal", spec=spec)
    cases = asyncio.run(load_cases(FakeClient({("ns", "cases"): {"eval.jsonl": jsonl}}), req))
    assert [c.id for c in cases] == [f"c{i}" for i in range(12)]
    with pytest.raises(DatasetError, match="has no key 'eval.jsonl'"):
        asyncio.run(load_cases(FakeClient({("ns", "cases"): {"other": jsonl}}), req))
    with pytest.raises(DatasetError, match="ConfigMap ns/cases: cannot read"):
        asyncio.run(load_cases(FakeClient(), req))


def test_load_cases_s3_secret_missing_key_names_no_value(servers):
    spec = evaluation(dataset={"s3": {"uri": "s3://bucket/cases.jsonl",
                                      "s3": {"credentialsSecret": {"name": "creds"}}}})
    req = request(servers, "equal", spec=spec)
    client = FakeClient(secrets={("ns", "creds"): {"AWS_ACCESS_KEY_ID": "AKIA-SECRET-ID"}})
    with pytest.raises(DatasetError) as info:
        asyncio.run(load_cases(client, req, AWS))
    assert "Secret ns/creds" in str(info.value) and "AWS_SECRET_ACCESS_KEY" in str(info.value)
    assert "AKIA-SECRET-ID" not in str(info.value)


AWS = (S3EndpointRule(host="*.amazonaws.com"),)


def test_an_s3_dataset_on_an_endpoint_the_platform_did_not_allow_is_refused_before_any_connection(servers):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    try:
        for rules, http in (((), False), (AWS, False), ((S3EndpointRule(host="127.0.0.1"),), True)):
            spec = evaluation(dataset={"s3": {"uri": "s3://bucket/cases.jsonl",
                                              "s3": {"endpoint": f"http://127.0.0.1:{port}"}}})
            with pytest.raises(DatasetError, match="s3Endpoints") as info:
                asyncio.run(load_cases(FakeClient(), request(servers, "equal", spec=spec), rules))
            assert ("plain http" in str(info.value)) == http
            with pytest.raises(TimeoutError):
                listener.accept()  # nothing connected
    finally:
        listener.close()


def test_only_a_secret_that_opted_in_is_sent_and_only_to_the_hosts_it_names(servers):
    spec = evaluation(dataset={"s3": {"uri": "s3://bucket/cases.jsonl",
                                      "s3": {"credentialsSecret": {"name": "db-password"}}}})
    req = request(servers, "equal", spec=spec)
    values = {"AWS_ACCESS_KEY_ID": "MARKER-ID", "AWS_SECRET_ACCESS_KEY": "MARKER-SECRET"}
    for client, why in ((FakeClient(secrets={("ns", "db-password"): values}, labels={}), "not labelled"),
                        (FakeClient(secrets={("ns", "db-password"): values},
                                    annotations={"slmfleet.io/s3-endpoints": "minio.storage.svc, *.example.com"}),
                         "does not allow this endpoint")):
        with pytest.raises(DatasetError, match=why) as info:
            asyncio.run(load_cases(client, req, AWS))
        assert "MARKER" not in str(info.value)
    # Keys other than the defaults only if the Secret lists them (slmfleet.io/s3-credential-keys).
    spec = evaluation(dataset={"s3": {"uri": "s3://bucket/cases.jsonl", "s3": {"credentialsSecret": {
        "name": "db-password", "accessKeyIdKey": "user", "secretAccessKeyKey": "password"}}}})
    client = FakeClient(secrets={("ns", "db-password"): {"user": "MARKER-USER", "password": "MARKER-PASSWORD"}})
    with pytest.raises(DatasetError, match="slmfleet.io/s3-credential-keys annotation") as info:
        asyncio.run(load_cases(client, request(servers, "equal", spec=spec), AWS))
    assert "MARKER" not in str(info.value)


def test_load_cases_checks_expectations_against_the_scorers(servers):
    spec = evaluation(dataset={"inline": [{"prompt": "x", "expected": "("}]}, scorers=[{"type": "regex"}])
    with pytest.raises(DatasetError, match="invalid pattern"):
        asyncio.run(load_cases(FakeClient(), request(servers, "equal", spec=spec)))


# --- live watch -------------------------------------------------------------------------------------

LIVE = Thresholds(max_p95_latency_seconds=0.4, max_error_rate=0.05)


def traffic(url: str, n: int, concurrency: int = 32) -> None:
    cases = parse_cases(CASES[:n])
    asyncio.run(evaluate(cases, Endpoint(url, MODEL), ["exact_match"], concurrency=concurrency, timeout=10))


def test_live_watch_slow_candidate_fails_on_p95(servers):
    watch = LiveWatch()
    urls = [servers["slow"]]
    first = asyncio.run(watch.check("w-slow", urls, MODEL, LIVE))
    assert first.verdict == "insufficient" and "baseline" in first.reason
    traffic(servers["slow"], 24)
    check = asyncio.run(watch.check("w-slow", urls, MODEL, LIVE))
    assert check.verdict == "fail", check
    assert check.requests == 24 and "p95 latency" in check.reason and check.p95_latency_seconds > 0.4


def test_live_watch_good_candidate_passes_and_merges_pods(servers):
    watch = LiveWatch()
    urls = [servers["equal"], servers["stable"]]  # two pods of the "candidate"
    assert asyncio.run(watch.check("w-good", urls, MODEL, LIVE)).verdict == "insufficient"
    traffic(servers["equal"], 15)
    traffic(servers["stable"], 15)
    check = asyncio.run(watch.check("w-good", urls, MODEL, LIVE))
    assert check.verdict == "pass", check
    assert check.requests == 30 and check.error_rate == 0.0 and check.p95_latency_seconds < 0.4


def test_live_watch_few_requests_are_insufficient(servers):
    watch = LiveWatch()
    urls = [servers["half"]]
    asyncio.run(watch.check("w-few", urls, MODEL, LIVE))
    traffic(servers["half"], 10)
    check = asyncio.run(watch.check("w-few", urls, MODEL, LIVE))
    assert check.verdict == "insufficient" and check.requests == 10 and "fewer than 20" in check.reason
    watch.forget(lambda w: False)
    assert asyncio.run(watch.check("w-few", urls, MODEL, LIVE)).reason.startswith("baseline")


def exposition(requests: int, errors: int, le_counts: dict[str, int]) -> str:
    lines = [
        f'http_requests_total{{handler="/v1/completions",method="POST",status="2xx"}} {requests - errors}',
        f'http_requests_total{{handler="/v1/completions",method="POST",status="5xx"}} {errors}',
    ]
    lines += [f'vllm:e2e_request_latency_seconds_bucket{{le="{le}",model_name="{MODEL}"}} {n}'
              for le, n in le_counts.items()]
    return "\n".join(lines) + "\n"


def test_live_watch_rebaselines_new_and_restarted_pods_and_skips_scrape_errors():
    pages = {
        "a": [exposition(10, 0, {"0.5": 10, "1.0": 10, "+Inf": 10}),
              exposition(40, 3, {"0.5": 35, "1.0": 40, "+Inf": 40})],
        "b": [exposition(5, 0, {"0.5": 5, "1.0": 5, "+Inf": 5}),
              exposition(8, 0, {"0.5": 8, "1.0": 8, "+Inf": 8}),
              exposition(2, 0, {"0.5": 2, "1.0": 2, "+Inf": 2})],  # b restarts before the third scrape
        "c": ["error"],
        "d": [exposition(50, 0, {"0.5": 50, "1.0": 50, "+Inf": 50})],  # d appears at the third scrape
    }
    calls = {k: 0 for k in pages}

    async def fake_scrape(url):
        page = pages[url][min(calls[url], len(pages[url]) - 1)]
        calls[url] += 1
        if page == "error":
            raise OSError("connection refused")
        if page is None:
            return parse_exposition("")  # b is not up yet: nothing served
        return parse_exposition(page)

    watch = LiveWatch(fake_scrape)
    thresholds = Thresholds(max_p95_latency_seconds=2.0, max_error_rate=0.05)
    first = asyncio.run(watch.check("w", ["a", "b", "c"], MODEL, thresholds))
    assert first.verdict == "insufficient" and "2 of 3" in first.reason and "connection refused" in first.reason
    second = asyncio.run(watch.check("w", ["a", "b", "c"], MODEL, thresholds))
    # a: 30 requests, 3 errors; b: 3 requests; c skipped: 3 of 33 > 0.05
    assert second.requests == 33 and second.verdict == "fail" and "error rate" in second.reason
    assert second.p95_latency_seconds is not None and 0.5 < second.p95_latency_seconds <= 1.0
    third = asyncio.run(watch.check("w", ["a", "b", "d"], MODEL, thresholds))
    # b restarted and d is new: both baselined now, only a counts
    assert third.requests == 30 and "2 pod(s) (re)baselined" in third.reason
    fourth = asyncio.run(watch.check("w", ["a", "b", "d"], MODEL, thresholds))
    assert fourth.requests == 30  # b and d did nothing since their new baselines
