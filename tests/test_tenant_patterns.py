"""Tenant regexes and JSON Schemas (issue 13): RE2 in linear time for every tenant pattern, schemas
refused when the rollout or the dataset is parsed (remote references, invalid schemas, patterns RE2
does not take), nothing ever fetched, and scoring off the event loop.

The catastrophic patterns here would take Python's `re` hours; with RE2 they take microseconds.
The timeouts are generous bounds that only a backtracking engine could reach."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from slmfleet.api.modelrollout import ModelRollout
from slmfleet.api.tenant_patterns import MAX_PATTERN_LENGTH, PatternError, SchemaError, check_schema, compile_regex
from slmfleet.evaluation import evaluate, parse_cases
from slmfleet.evaluation.dataset import DatasetError, parse_jsonl
from slmfleet.evaluation.runner import Endpoint
from slmfleet.evaluation.scorers import (
    MAX_SCHEMA_STEPS,
    SCORERS,
    Scorer,
    ScorerError,
    build_scorer,
    register_scorer,
)
from slmfleet.planning.common import InvalidSpec
from slmfleet.planning.rollout import RolloutObserved
from tests.test_model_plan import at, condition
from tests.test_rollout_plan import new_candidate, rollout_body, stable_world

EVIL = r"^(a+)+$"
EVIL_TEXT = "a" * 40 + "!"  # Python's re backtracks 2^40 times on this before it says no


def score(spec: Any, response: str, expected: Any = None) -> float:
    scorer = build_scorer(spec)
    scorer.check(expected)
    return scorer.score(response, expected)


# --- RE2 for every tenant regex ---------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_a_catastrophic_regex_scorer_finishes_at_once():
    assert score({"type": "regex", "pattern": EVIL}, EVIL_TEXT) == 0.0
    assert score({"type": "regex", "pattern": EVIL, "mode": "full"}, EVIL_TEXT) == 0.0
    assert score({"type": "regex", "pattern": EVIL}, "a" * 40) == 1.0
    assert score({"type": "regex"}, EVIL_TEXT, EVIL) == 0.0  # the expectation as the pattern
    assert score({"type": "regex", "pattern": r"^(\w+\s?)*$"}, "word " * 30 + "!") == 0.0


@pytest.mark.timeout(20)
@pytest.mark.parametrize("dialect", [None, "https://json-schema.org/draft/2019-09/schema",
                                     "http://json-schema.org/draft-07/schema#", "http://json-schema.org/draft-04/schema#"])
@pytest.mark.parametrize("schema, answer, want", [
    ({"type": "string", "pattern": EVIL}, json.dumps(EVIL_TEXT), 0.0),
    ({"type": "string", "pattern": EVIL}, json.dumps("a" * 40), 1.0),
    ({"type": "object", "patternProperties": {EVIL: {"type": "integer"}}}, json.dumps({EVIL_TEXT: "x"}), 1.0),
    ({"type": "object", "patternProperties": {EVIL: {"type": "integer"}}}, json.dumps({"a" * 40: "x"}), 0.0),
    # additionalProperties and unevaluatedProperties match patternProperties' keys too
    ({"patternProperties": {EVIL: {}}, "additionalProperties": False}, json.dumps({EVIL_TEXT: 1}), 0.0),
    ({"patternProperties": {EVIL: {}}, "additionalProperties": False}, json.dumps({"aaa": 1}), 1.0),
    ({"properties": {"p": {"patternProperties": {EVIL: {}}, "additionalProperties": False}}},
     json.dumps({"p": {EVIL_TEXT: 1}}), 0.0),
])
def test_catastrophic_json_schema_patterns_finish_at_once(dialect, schema, answer, want):
    if dialect is not None:
        schema = {"$schema": dialect, **schema}
    assert score({"type": "json_schema", "schema": schema}, answer) == want


@pytest.mark.timeout(20)
@pytest.mark.parametrize("dialect", ["https://json-schema.org/draft/2020-12/schema",
                                     "https://json-schema.org/draft/2019-09/schema"])
def test_unevaluated_properties_match_pattern_properties_with_re2(dialect):
    schema = {"$schema": dialect, "patternProperties": {EVIL: True}, "unevaluatedProperties": False}
    assert score({"type": "json_schema", "schema": schema}, json.dumps({EVIL_TEXT: 1})) == 0.0
    assert score({"type": "json_schema", "schema": schema}, json.dumps({"aaaa": 1})) == 1.0


def test_re2_syntax_python_lacks_is_accepted_and_results_are_as_before():
    assert score({"type": "regex", "pattern": r"^\pL+\z", "mode": "full"}, "Zürich") == 1.0
    assert score({"type": "json_schema", "schema": {"type": "string", "pattern": r"^\p{Greek}+$"}}, '"αβγ"') == 1.0
    # {expected} is an escaped literal: spaces, dots, newlines and brackets match only themselves
    scorer = {"type": "regex", "pattern": r"^answer: {expected}$", "multiline": True}
    assert score(scorer, "x\nanswer: a.b [c] (d)\ny", "a.b [c] (d)") == 1.0
    assert score(scorer, "answer: aXb [c] (d)", "a.b [c] (d)") == 0.0
    assert score({"type": "regex", "pattern": "{expected}"}, "1+1 = 2", "1+1 = 2") == 1.0


@pytest.mark.parametrize("pattern, why", [
    (r"(a)\1", "RE2 has no backreferences"),
    (r"foo(?=bar)", "RE2 has no lookaround"),
    (r"(?<!x)y", "RE2 has no lookaround"),
    (r"end\Z", r"write \z"),
    (r"(?>a+)b", "RE2 has no atomic groups"),
    ("(unclosed", "missing )"),
    ("(a{1000}){1000}", "invalid repetition size"),
    ("x" * (MAX_PATTERN_LENGTH + 1), f"more than the {MAX_PATTERN_LENGTH}"),
])
def test_patterns_re2_does_not_take_are_refused_with_the_reason(pattern, why):
    with pytest.raises(PatternError, match="invalid pattern") as info:
        compile_regex(pattern)
    assert why in str(info.value)
    with pytest.raises(ScorerError, match="regex: invalid pattern") as info:
        build_scorer({"type": "regex", "pattern": pattern})
    assert why in str(info.value)
    with pytest.raises(ScorerError, match="RE2|more than"):
        build_scorer({"type": "regex", "pattern": f"{pattern}{{expected}}"})


def test_a_pattern_too_big_for_re2s_memory_budget_is_refused():
    with pytest.raises(PatternError, match="pattern too large"):
        compile_regex(r"\pL{1,1000}\pL{1,1000}\pL{1,1000}")


def test_a_per_case_pattern_is_refused_when_the_dataset_is_parsed():
    rows = [{"prompt": "p", "expected": "4"},
            {"prompt": "q", "expected": "x", "scorers": [{"type": "regex", "pattern": r"(?=x)x"}]}]
    with pytest.raises(DatasetError, match=r"cases\.jsonl line 2: .*RE2 has no lookaround"):
        parse_jsonl("\n".join(json.dumps(r) for r in rows), "cases.jsonl", default_scorers=[build_scorer("exact_match")])
    # the expectation is the pattern of a regex scorer without one
    with pytest.raises(DatasetError, match=r"cases\.jsonl line 1: regex: regex: invalid pattern '\(a\)\\\\1'"):
        parse_jsonl(json.dumps({"prompt": "p", "expected": r"(a)\1"}), "cases.jsonl",
                    default_scorers=[build_scorer("regex")])


# --- JSON Schemas: checked when parsed, nothing fetched ----------------------------------------------

@pytest.mark.parametrize("schema, why", [
    ({"$ref": "https://example.com/schema.json"}, "$ref 'https://example.com/schema.json' at the root is not local"),
    ({"properties": {"a": {"$ref": "other.json#/x"}}}, "at properties/a is not local"),
    ({"$dynamicRef": "https://example.com/s#meta"}, "$dynamicRef 'https://example.com/s#meta' at the root is not local"),
    ({"$schema": "https://example.com/my-dialect"}, "not a dialect this operator knows"),
    ({"type": "strin"}, "invalid JSON Schema at type"),
    ({"properties": {"n": {"minLength": -1}}}, "invalid JSON Schema at properties/n/minLength"),
    ({"required": "name"}, "invalid JSON Schema at required"),
    ({"$ref": "#/$defs/missing"}, "points nowhere in the schema"),
    ({"properties": {"pattern": {"type": "string", "pattern": "(?!x)"}}}, "pattern at properties/pattern"),
    ({"patternProperties": {r"^(\w)\1$": {}}}, "patternProperties at the root"),
    # a reference into data makes that data a schema: it is checked as one
    ({"const": {"$ref": "http://127.0.0.1:9/x.json"}, "allOf": [{"$ref": "#/const"}]}, "at #/const is not local"),
    ({"default": {"pattern": "(?=a)"}, "$ref": "#/default"}, "pattern at #/default"),
])
def test_a_schema_that_is_not_accepted_is_refused_at_build_with_where(schema, why):
    with pytest.raises(SchemaError) as info:
        check_schema(schema)
    assert why in str(info.value)
    with pytest.raises(ScorerError, match="json_schema: ") as info:
        build_scorer({"type": "json_schema", "schema": schema})
    assert why in str(info.value)


def test_accepted_schemas():
    for schema in (True, {}, {"$ref": "#/$defs/a", "$defs": {"a": {"type": "string"}}},
                   {"$defs": {"node": {"properties": {"next": {"$ref": "#/$defs/node"}}}}, "$ref": "#/$defs/node"},
                   {"$schema": "http://json-schema.org/draft-04/schema#", "definitions": {"a~b": {}},
                    "properties": {"x": {"$ref": "#/definitions/a~0b"}}},
                   {"$id": "https://example.com/root.json", "$ref": "#/$defs/a", "$defs": {"a": {}}},
                   {"enum": [{"$ref": "https://example.com/data-not-a-ref"}], "examples": [{"pattern": "(?=x)"}]}):
        check_schema(schema)
    with pytest.raises(SchemaError, match="nested more than"):
        deep: dict[str, Any] = {}
        for _ in range(100):
            deep = {"not": deep}
        check_schema(deep)


@pytest.fixture
def listener():
    """A loopback listener that counts the connections it gets."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    yield sock
    sock.close()


def connections(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            return count
        conn.close()
        count += 1


def test_a_remote_ref_is_never_fetched_even_past_the_parse_check(listener):
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/schema.json"
    with pytest.raises(ScorerError, match="not local"):
        build_scorer({"type": "json_schema", "schema": {"$ref": url}})
    # With a nested $id, where a reference resolves is jsonschema's business: one that leaves the
    # schema fails the scoring, and nothing is fetched.
    schema = {"$id": "https://example.com/a.json",
              "properties": {"x": {"$id": "https://example.com/b/", "$ref": "#/$defs/missing"}}}
    scorer = build_scorer({"type": "json_schema", "schema": schema})
    with pytest.raises(ScorerError, match="cannot be resolved"):
        scorer.score('{"x": 1}', None)
    from jsonschema.validators import Draft202012Validator

    from slmfleet.evaluation import scorers
    validator = scorers._budgeted(Draft202012Validator)({"$ref": url}, registry=scorers._LOCAL_ONLY)
    with pytest.raises(ScorerError, match="cannot be resolved"):
        scorers._is_valid(validator, 1)
    assert connections(listener) == 0


@pytest.mark.timeout(20)
def test_a_schema_whose_references_fan_out_gives_up_within_its_budget():
    # Each level tries both branches of the next: 2^40 evaluations for an integer that is no string.
    defs = {f"l{i}": {"anyOf": [{"$ref": f"#/$defs/l{i + 1}"}, {"$ref": f"#/$defs/l{i + 1}"}]} for i in range(40)}
    defs["l40"] = {"type": "string"}
    scorer = build_scorer({"type": "json_schema", "schema": {"$defs": defs, "$ref": "#/$defs/l0"}})
    assert scorer.score('"fine"', None) == 1.0
    with pytest.raises(ScorerError, match=f"more than {MAX_SCHEMA_STEPS} steps"):
        scorer.score("1", None)
    loop = build_scorer({"type": "json_schema", "schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}})
    with pytest.raises(ScorerError, match="steps|loop"):
        loop.score("1", None)


# --- the ModelRollout: refused when parsed -----------------------------------------------------------

BAD_SCORERS = [
    ({"type": "regex", "pattern": r"(\d)\1"}, "RE2 has no backreferences"),
    ({"type": "regex", "pattern": r"^{expected}(?=\.)"}, "RE2 has no lookaround"),
    ({"type": "jsonSchema", "schema": {"$ref": "http://169.254.169.254/latest/meta-data"}}, "is not local"),
    ({"type": "jsonSchema", "schema": {"type": "object", "properties": {"n": {"type": "numbr"}}}},
     "invalid JSON Schema at properties/n/type"),
    ({"type": "jsonSchema", "schema": {"type": "string", "pattern": "(?<=a)b"}}, "RE2 has no lookaround"),
]


@pytest.mark.parametrize("scorer, why", BAD_SCORERS)
def test_a_rollout_with_a_bad_scorer_is_invalid_when_parsed(scorer, why):
    body = rollout_body(evaluation={"dataset": {"inline": [{"prompt": "2+2=", "expected": "4"}]},
                                    "scorers": [{"type": "exactMatch"}, scorer]})
    parsed = RolloutObserved.of(body).rollout
    assert isinstance(parsed, InvalidSpec)
    assert "spec.evaluation.scorers.1" in parsed.message and why in parsed.message
    good = rollout_body()
    assert isinstance(RolloutObserved.of(good).rollout, ModelRollout)


def test_the_rollout_says_degraded_invalid_spec_and_nothing_is_evaluated():
    scorer, why = BAD_SCORERS[0]
    world, _ = stable_world()
    world.rollout["spec"]["evaluation"]["scorers"] = [scorer]  # stored before the operator checked them
    new_candidate(world)
    world.reconcile(at(1))
    world.candidate_ready()
    world.reconcile(at(2))
    degraded = condition(world.rollout_status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert why in degraded["message"]
    assert world.started == []
    assert "InvalidSpec" in [e.reason for e in world.rollout_events]


# --- scoring off the event loop ----------------------------------------------------------------------

class _Slow(Scorer):
    """Blocks its thread for a while, like a slow scorer would, and notes where it ran and how far
    the event loop's ticker got meanwhile (`probe`)."""

    type = "test_slow"
    threads: list[str] = []
    ticks_during: list[int] = []
    probe: Any = staticmethod(lambda: 0)

    def configure(self, opts: Any) -> None:
        self.seconds = float(opts.take("seconds") or 0.3)

    def score(self, response: str, expected: Any) -> float:
        cls = type(self)
        cls.threads.append(threading.current_thread().name)
        before = cls.probe()
        time.sleep(self.seconds)
        cls.ticks_during.append(cls.probe() - before)
        return 1.0 if response == "ok" else 0.0


@pytest.fixture
def slow_scorer():
    register_scorer(_Slow)
    _Slow.threads, _Slow.ticks_during = [], []
    yield
    SCORERS.pop(_Slow.type, None)


def test_scoring_runs_off_the_event_loop_which_keeps_ticking(slow_scorer):
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"text": "ok"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", answer)
    cases = parse_cases([{"prompt": f"p{i}", "expected": "ok"} for i in range(4)])

    async def go() -> tuple[Any, list[float]]:
        ticks: list[float] = []
        _Slow.probe = staticmethod(lambda: len(ticks))

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        async with TestServer(app, host="127.0.0.1") as server:
            tick = asyncio.create_task(ticker())
            try:
                run = await evaluate(cases, Endpoint(str(server.make_url("")), "m"),
                                     [{"type": "test_slow", "seconds": 0.4}], concurrency=1)
            finally:
                tick.cancel()
        return run, ticks

    run, ticks = asyncio.run(go())
    assert run.summary.score == 1.0 and run.n == 4  # the same scores, from a thread
    assert len(_Slow.threads) == 4 and all(name.startswith("slmfleet-score") for name in _Slow.threads)
    # The loop ticked while every answer was being scored: scoring on the loop would leave it none.
    assert len(_Slow.ticks_during) == 4 and all(n > 0 for n in _Slow.ticks_during), _Slow.ticks_during
