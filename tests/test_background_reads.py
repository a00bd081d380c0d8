"""I/O off the workers: background reads with an overall deadline that queue their models again,
the weights reader on top of them, a model that waits for its first read, and evaluations that
hang past their deadline."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from slmfleet.api.config import S3EndpointRule
from slmfleet.api.smallmodel import SmallModel
from slmfleet.controller import weights_reader
from slmfleet.controller.background import BackgroundReads
from slmfleet.controller.evaluations import EvaluationRequest, Evaluations, evaluation_deadline
from slmfleet.evaluation import Endpoint
from slmfleet.weights.facts import WeightsFacts, WeightsReading
from tests.test_handlers_evaluations import MODEL, FakeClient, evaluation
from tests.test_model_plan import L4, L4_MIB, NAME, World, gpu_node, model_body, placed


async def settle(reads: BackgroundReads, key: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while reads.running(key):
        assert time.monotonic() < deadline, f"{key} still running"
        await asyncio.sleep(0.01)


def test_one_read_per_key_every_asker_queued_again_and_the_result_kept():
    queued: list[tuple[str, str]] = []
    calls = 0

    async def read() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return 42

    async def go() -> None:
        reads: BackgroundReads[int] = BackgroundReads(queued.append, 5.0, "test read")
        reads.start("k", ("ns", "a"), read, lambda d: -1)
        reads.start("k", ("ns", "b"), read, lambda d: -1)  # runs already: b only waits for it
        assert reads.running("k") and reads.result("k") is None
        await settle(reads, "k")
        assert reads.result("k")[1] == 42
        await reads.close()

    asyncio.run(go())
    assert calls == 1
    assert sorted(queued) == [("ns", "a"), ("ns", "b")]


def test_a_read_past_its_deadline_ends_with_the_timeout_value_and_a_failing_one_keeps_the_last():
    queued: list[object] = []

    async def hang() -> str:
        await asyncio.sleep(3600)
        return "never"

    async def boom() -> str:
        raise OSError("connection reset")

    async def go() -> None:
        reads: BackgroundReads[str] = BackgroundReads(queued.append, 0.2, "test read")
        reads.start("k", "m", hang, lambda d: f"nothing within {d}s")
        await settle(reads, "k")
        assert reads.result("k")[1] == "nothing within 0.2s"
        reads.start("k", "m", boom, lambda d: "timeout")
        await settle(reads, "k")
        assert reads.result("k")[1] == "nothing within 0.2s", "a read that raised changes nothing"
        reads.start("gone", "m", hang, lambda d: "timeout")
        reads.forget(lambda key: key != "gone")
        await asyncio.sleep(0)
        assert not reads.running("gone") and reads.result("gone") is None

    asyncio.run(go())
    assert queued == ["m", "m"], "queued again after each read that ended, not after a forgotten one"


def s3_model(endpoint: str = "http://127.0.0.1:9") -> SmallModel:
    body = model_body()
    body["spec"]["source"] = {"uri": "s3://bucket/qwen", "digest": body["spec"]["source"]["digest"],
                              "s3": {"endpoint": endpoint}}
    return SmallModel.model_validate(body)


def test_the_weights_reader_answers_at_once_and_reads_in_the_background(monkeypatch):
    """A storage endpoint that never answers: the reader returns at once (the model waits), and
    the read ends at the deadline as StorageUnreachable, worth retrying."""
    release = threading.Event()

    def inspect_hangs(*args, **kwargs):
        release.wait(10)
        return WeightsFacts(digest="sha256:x")

    async def no_credentials(client, namespace, s3, endpoints):
        return object()

    monkeypatch.setattr(weights_reader, "inspect_s3", inspect_hangs)
    monkeypatch.setattr(weights_reader, "s3_client_for", no_credentials)
    queued: list[object] = []
    model = s3_model()

    async def go() -> None:
        reader = weights_reader.WeightsReader(None, queued.append, deadline_seconds=0.3)  # type: ignore[arg-type]
        started = time.monotonic()
        first = reader.facts("ns", model, ("ns", "m"))
        assert isinstance(first, WeightsReading)
        assert time.monotonic() - started < 0.2, "returned without waiting for the storage"
        assert isinstance(reader.facts("ns", model, ("ns", "other")), WeightsReading)
        [key] = reader.reads._tasks
        await settle(reader.reads, key)
        facts = reader.facts("ns", model, ("ns", "m"))
        assert facts is not None and not isinstance(facts, WeightsReading)
        assert (facts.problem, facts.transient) == ("StorageUnreachable", True)
        assert "no answer within" in facts.message
        release.set()
        await reader.close()

    asyncio.run(go())
    assert sorted(queued) == [("ns", "m"), ("ns", "other")]


def test_a_model_waits_for_the_first_read_of_its_weights_without_being_degraded():
    world = World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1)])
    world.weights = WeightsReading()
    plan = world.reconcile()
    assert [o["kind"] for o in plan.apply] == []
    assert world.condition("WeightsVerified")["reason"] == "Reading"
    progressing = world.condition("Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "ReadingWeights")
    assert "Degraded" not in {c["type"] for c in world.status["conditions"]}
    assert not [e for e in plan.events if e.type == "Warning"]
    world.weights = None
    placed(world)
    assert world.condition("Ready")["status"] == "True", f"{NAME} is served once the read ended"


@pytest.fixture
def silent_endpoint():
    """Accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_an_evaluation_that_hangs_past_its_deadline_ends_as_an_error(silent_endpoint):
    spec = evaluation(requestTimeoutSeconds=600)
    req = EvaluationRequest(id="rev-b/step-0", namespace="ns", rollout="r", rollout_uid="uid-1", step=0,
                            evaluation=spec, sample_size=spec.sample_size, stable=Endpoint(silent_endpoint, MODEL),
                            candidate=Endpoint(silent_endpoint, MODEL), stable_revision="rev-a",
                            candidate_revision="rev-b")
    # The default deadline scales with what the evaluation may take: 60 cases, 16 at a time, 600 s each.
    assert evaluation_deadline(req) == 60 + 2 * 2 * 4 * 600
    done = []

    async def go():
        evals = Evaluations(lambda r: _inline_cases(r), lambda r, out: done.append(out), deadline=lambda r: 0.5)
        evals.ensure(req)
        deadline = time.monotonic() + 10
        while evals.running(req.id):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await evals.close()
        return evals.outcome(req.id)

    outcome = asyncio.run(go())
    assert outcome.verdict == "error" and "did not finish within" in outcome.reason
    assert done == [outcome]


async def _inline_cases(req):
    from slmfleet.controller.evaluations import load_cases

    return await load_cases(None, req)  # inline: no API calls



async def first_verdict(reader: weights_reader.WeightsReader,
                        model: SmallModel) -> tuple[str, WeightsFacts | WeightsReading | None]:
    """The key of the model's read and its facts once that first read (in the background) ended."""
    assert isinstance(reader.facts("ns", model, ("ns", "m")), WeightsReading)
    [key] = reader.reads._tasks
    await settle(reader.reads, key)
    return key, reader.facts("ns", model, ("ns", "m"))


def test_an_endpoint_off_the_allow_list_is_a_final_verdict_and_blocks_the_model():
    """Refused before a connection: no Secret read, no storage contacted; the model gets no pods
    (they would send the Secret to that endpoint too)."""
    queued: list[object] = []
    model = s3_model("http://127.0.0.1:9")

    async def go() -> WeightsFacts | WeightsReading | None:
        reader = weights_reader.WeightsReader(None, queued.append, [S3EndpointRule(host="minio.storage.svc")])  # type: ignore[arg-type]
        key, facts = await first_verdict(reader, model)
        assert not reader.reads.running(key), "a final verdict is not read again"
        await reader.close()
        return facts

    facts = asyncio.run(go())
    assert isinstance(facts, WeightsFacts)
    assert (facts.problem, facts.transient) == ("EndpointNotAllowed", False)
    assert "minio.storage.svc" in facts.message and "127.0.0.1" not in facts.message
    world = World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1)])
    world.weights = facts
    plan = world.reconcile()
    assert [o for o in plan.apply if o["kind"] == "Deployment"] == []
    assert world.condition("Degraded")["reason"] == "EndpointNotAllowed"


def test_results_are_bounded_the_oldest_go_first():
    async def go() -> BackgroundReads[int]:
        reads: BackgroundReads[int] = BackgroundReads(lambda key: None, 5.0, "test read", max_results=3)
        for i in range(5):
            async def read(i: int = i) -> int:
                return i

            reads.start(f"k{i}", "m", read, lambda d: -1)
            await settle(reads, f"k{i}")
        return reads

    reads = asyncio.run(go())
    assert [reads.result(f"k{i}") is not None for i in range(5)] == [False, False, True, True, True]


def test_a_secret_key_the_secret_does_not_list_blocks_the_model():
    """Like a Secret not labelled as S3 credentials: the model gets no pods (their loader would
    read those keys through secretKeyRef), and the read is retried (the owner may annotate it)."""
    body = model_body()
    body["spec"]["source"] = {"uri": "s3://bucket/qwen", "digest": body["spec"]["source"]["digest"],
                              "s3": {"endpoint": "https://minio.storage.svc", "credentialsSecret": {
                                  "name": "db", "accessKeyIdKey": "user", "secretAccessKeyKey": "password"}}}
    model = SmallModel.model_validate(body)
    client = FakeClient(secrets={("ns", "db"): {"user": "MARKER-USER", "password": "MARKER-PASSWORD"}})

    async def go() -> WeightsFacts | WeightsReading | None:
        reader = weights_reader.WeightsReader(client, lambda key: None, [S3EndpointRule(host="minio.storage.svc")])  # type: ignore[arg-type]
        _, facts = await first_verdict(reader, model)
        await reader.close()
        return facts

    facts = asyncio.run(go())
    assert isinstance(facts, WeightsFacts)
    assert (facts.problem, facts.transient) == ("CredentialsNotAllowed", True)
    assert "slmfleet.io/s3-credential-keys" in facts.message and "MARKER" not in facts.message
    world = World(body, [gpu_node("l4-a", L4, L4_MIB, 1)])
    world.weights = facts
    plan = world.reconcile()
    assert [o for o in plan.apply if o["kind"] == "Deployment"] == []
    assert world.condition("Ready")["reason"] == "CredentialsNotAllowed"
