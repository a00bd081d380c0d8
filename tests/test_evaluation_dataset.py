"""Evaluation cases: JSONL, inline lists and S3 objects, errors with their line, deterministic samples."""

import json
import random

import boto3
import pytest
from moto import mock_aws

from slmfleet.evaluation.dataset import (
    Case,
    DatasetError,
    Message,
    derive_seed,
    load_file,
    load_s3_jsonl,
    parse_cases,
    parse_jsonl,
    sample,
)
from slmfleet.evaluation.scorers import build_scorers

CHAT = {"id": "add", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "expected": "4"}
PROMPT = {"prompt": "The capital of France is", "expected": ["Paris", "paris"], "category": "geo"}


def jsonl(*rows):
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def test_parses_chat_and_prompt_cases():
    cases = parse_jsonl(jsonl(CHAT, "", PROMPT, {"prompt": "x", "expected": {"label": "a"},
                                                  "scorers": ["json_field:field=label"]}), "cases.jsonl")
    chat, prompt, custom = cases
    assert chat == Case("add", "4", (Message("system", "Be brief."), Message("user", "2+2?")))
    assert chat.kind == "chat" and prompt.kind == "completion"
    assert prompt.id == "line-3"  # its line: the blank line 2 is skipped but still counted
    assert prompt.prompt == "The capital of France is" and prompt.expected == ["Paris", "paris"]
    assert prompt.extra == {"category": "geo"}
    assert custom.scorers is not None and custom.scorers[0].type == "json_field"
    assert custom.to_dict()["scorers"][0]["field"] == "label"
    assert prompt.to_dict() == {"id": "line-3", **PROMPT}


def test_bytes_with_a_bom_and_integer_ids():
    text = "\ufeff" + jsonl({"id": 7, "prompt": "p", "expected": "e"})
    (case,) = parse_jsonl(text.encode("utf-8"))
    assert case.id == "7"
    with pytest.raises(DatasetError, match=r"src: not UTF-8 text \(byte 0\)"):
        parse_jsonl(b"\xff\xfe{}", "src")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "expected": "y"', r"cases.jsonl line 3: not valid JSON: Expecting ',' delimiter \(column 32\)"),
    ('[1, 2]', "cases.jsonl line 3: a case must be a JSON object, not an array"),
    ('"text"', "cases.jsonl line 3: a case must be a JSON object, not str"),
    ('{"expected": "y"}', "cases.jsonl line 3: a case needs either 'messages' or 'prompt'$"),
    ('{"prompt": "p", "messages": [{"role": "user", "content": "c"}]}', "either 'messages' or 'prompt', not both"),
    ('{"prompt": 5}', "line 3: 'prompt' must be a string"),
    ('{"messages": []}', "line 3: 'messages' must be a non-empty list"),
    ('{"messages": "hi"}', "line 3: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "c"}]}', "line 3: message 1 has role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "line 3: message 1 needs a string 'content'"),
    ('{"messages": [{"role": "user", "content": "c", "name": "x"}]}', r"line 3: message 1 has unknown keys \['name'\]"),
    ('{"messages": [{"role": "system", "content": "c"}]}', "line 3: 'messages' has no user message"),
    ('{"id": "", "prompt": "p"}', "line 3: 'id' must be a non-empty string or an integer"),
    ('{"id": true, "prompt": "p"}', "line 3: 'id' must be"),
    ('{"id": "a", "prompt": "p"}', r"line 3: duplicate id 'a' \(first at cases.jsonl line 1\)"),
    ('{"prompt": "p", "scorers": ["nope"]}', "line 3: unknown scorer type 'nope'"),
    ('{"prompt": "p", "scorers": 4}', "line 3: 'scorers' must be a list"),
    ('{"prompt": "p", "scorers": ["regex"], "expected": "("}', "line 3: regex: regex: invalid pattern"),
])
def test_errors_name_the_line(line, message):
    text = jsonl({"id": "a", "prompt": "ok", "expected": "x"}, {"prompt": "ok2", "expected": "x"}, line)
    with pytest.raises(DatasetError, match=message):
        parse_jsonl(text, "cases.jsonl")


def test_expectations_are_checked_against_the_scorers_that_will_use_them():
    scorers = build_scorers(["exact_match"])
    text = jsonl({"prompt": "a", "expected": "x"}, {"prompt": "b"})
    with pytest.raises(DatasetError, match="d.jsonl line 2: exact_match: exact_match needs an expected answer"):
        parse_jsonl(text, "d.jsonl", default_scorers=scorers)
    # A case with its own scorers is checked against those instead.
    ok = jsonl({"prompt": "a", "expected": "x"},
               {"prompt": "b", "scorers": [{"type": "json_schema", "schema": {"type": "object"}}]})
    assert len(parse_jsonl(ok, default_scorers=scorers)) == 2


def test_empty_datasets_are_refused():
    with pytest.raises(DatasetError, match="empty.jsonl: no cases"):
        parse_jsonl("\n  \n", "empty.jsonl")
    with pytest.raises(DatasetError, match="inline: no cases"):
        parse_cases([])


def test_inline_cases_name_their_position():
    cases = parse_cases([CHAT, PROMPT])
    assert [c.id for c in cases] == ["add", "case-2"]
    with pytest.raises(DatasetError, match=r"spec.evaluation.dataset.inline case 2: a case needs either"):
        parse_cases([CHAT, {"expected": "x"}], "spec.evaluation.dataset.inline")
    with pytest.raises(DatasetError, match="must be a list"):
        parse_cases({"prompt": "x"})


def test_inline_cases_from_api_models():
    class Model:  # what the API's pydantic models offer
        def __init__(self, data):
            self.data = data

        def model_dump(self, by_alias, exclude_none):
            assert by_alias and exclude_none
            return self.data

    (case,) = parse_cases([Model({"prompt": "p", "expected": "e"})])
    assert case.prompt == "p" and case.id == "case-1"


def test_files(tmp_path):
    (tmp_path / "cases.jsonl").write_text(jsonl(CHAT, PROMPT))
    (tmp_path / "cases.json").write_text(json.dumps([CHAT, PROMPT]))
    assert [c.id for c in load_file(tmp_path / "cases.jsonl")] == ["add", "line-2"]
    assert [c.id for c in load_file(tmp_path / "cases.json")] == ["add", "case-2"]
    (tmp_path / "bad.json").write_text('{"prompt": "x"}')
    with pytest.raises(DatasetError, match="not a JSON array of cases"):
        load_file(tmp_path / "bad.json")
    with pytest.raises(DatasetError, match="cannot read .*missing.jsonl"):
        load_file(tmp_path / "missing.jsonl")


def test_a_case_needs_exactly_one_input():
    with pytest.raises(DatasetError, match="either messages or a prompt"):
        Case("x", "e")
    with pytest.raises(DatasetError, match="either messages or a prompt"):
        Case("x", "e", (Message("user", "m"),), "p")


# --- sampling -----------------------------------------------------------------------------------------

def many(n=200):
    return parse_cases([{"id": f"c{i}", "prompt": f"question {i}", "expected": str(i)} for i in range(n)])


def test_sampling_is_deterministic_and_order_independent():
    cases = many()
    first = sample(cases, 30, seed="rollout-a")
    assert len(first) == 30 and len({c.id for c in first}) == 30
    assert sample(cases, 30, seed="rollout-a") == first
    shuffled = list(cases)
    random.Random(1).shuffle(shuffled)
    assert sample(shuffled, 30, seed="rollout-a") == first  # the same cases, in the same order
    assert sample(cases, 30, seed="rollout-b") != first
    assert sample(cases, 10, seed="rollout-a") == first[:10]  # smaller samples are prefixes
    assert {c.id for c in sample(cases, None, 3)} == {c.id for c in cases}
    assert len(sample(cases, 1000, 3)) == 200
    # The rank order is not the file's order: batches taken from the front are random subsets.
    assert [c.id for c in first] != sorted((c.id for c in first), key=lambda i: int(i[1:]))


def test_sampling_keys_on_content_not_position():
    cases = many(50)
    picked = {c.id for c in sample(cases, 10, 5)}
    # Appending cases can only displace picked cases with new ones, never reshuffle the old ones.
    grown = cases + parse_cases([{"id": f"new{i}", "prompt": f"new {i}", "expected": "x"} for i in range(50)])
    regrown = {c.id for c in sample(grown, 10, 5)}
    assert all(i in picked or i.startswith("new") for i in regrown)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_sample_sizes(n):
    with pytest.raises(ValueError, match="sample size"):
        sample(many(5), n, 0)


def test_derived_seeds():
    seed = derive_seed("team-a", "qwen-rollout", "rev1", "rev2")
    assert seed == derive_seed("team-a", "qwen-rollout", "rev1", "rev2") and len(seed) == 16
    assert seed != derive_seed("team-a", "qwen-rollout", "rev1", "rev3")
    assert derive_seed("a", "bc") != derive_seed("ab", "c")


# --- S3 (moto) ----------------------------------------------------------------------------------------

@pytest.fixture
def s3(monkeypatch):
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="evals")
        yield client


def test_s3_jsonl(s3):
    s3.put_object(Bucket="evals", Key="team-a/cases.jsonl", Body=jsonl(CHAT, PROMPT).encode())
    cases = load_s3_jsonl(s3, "s3://evals/team-a/cases.jsonl")
    assert [c.id for c in cases] == ["add", "line-2"]
    s3.put_object(Bucket="evals", Key="bad.jsonl", Body=jsonl(CHAT, "{oops").encode())
    with pytest.raises(DatasetError, match="s3://evals/bad.jsonl line 2: not valid JSON"):
        load_s3_jsonl(s3, "s3://evals/bad.jsonl")


def test_s3_errors(s3):
    with pytest.raises(DatasetError, match=r"s3://evals/missing.jsonl: cannot read the dataset: NoSuchKey \(HTTP 404\)"):
        load_s3_jsonl(s3, "s3://evals/missing.jsonl")
    with pytest.raises(DatasetError, match="cannot read the dataset: NoSuchBucket"):
        load_s3_jsonl(s3, "s3://nobucket/cases.jsonl")
    for uri in ("s3://evals/", "s3://evals", "https://x/y", "s3:///key"):
        with pytest.raises(DatasetError, match="s3://bucket"):
            load_s3_jsonl(s3, uri)
    s3.put_object(Bucket="evals", Key="big.jsonl", Body=jsonl(*[PROMPT] * 10).encode())
    with pytest.raises(DatasetError, match="bytes a dataset may have"):
        load_s3_jsonl(s3, "s3://evals/big.jsonl", max_bytes=100)
