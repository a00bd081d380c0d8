"""`slmfleet eval` against two real vLLM stand-ins on 127.0.0.1."""

import json
import os
import re
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from slmfleet.cli.main import main
from tests.standin_servers import free_port, standins

REPO = Path(__file__).resolve().parents[1]
STABLE = {"responses": [{"prompt": "2+2?", "completion": "4"}, {"prompt": "Capital of France?", "completion": "Paris."},
                        {"prompt": "Classify: great", "completion": '{"label": "positive"}'}],
          "default_completion": "I do not know", "latency_ms": {"mean": 10, "p95": 10}}
CANDIDATE = {"responses": [{"prompt": "2+2?", "completion": "5"}, {"prompt": "Capital of France?", "completion": "paris"},
                           {"prompt": "Classify: great", "completion": '{"label": "negative"}'}],
             "default_completion": "I do not know", "latency_ms": {"mean": 30, "p95": 30}}
CASES = [
    {"id": "add", "messages": [{"role": "user", "content": "2+2?"}], "expected": "4"},
    {"id": "capital", "messages": [{"role": "user", "content": "Capital of France?"}], "expected": "Paris"},
    {"id": "other", "prompt": "Tell me", "expected": "I do not know"},
    {"id": "label", "messages": [{"role": "user", "content": "Classify: great"}], "expected": "positive",
     "scorers": ["json_field:field=label"]},
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with standins(tmp_path_factory.mktemp("cli-standins"), {"stable": STABLE, "candidate": CANDIDATE}, "tiny") as urls:
        yield urls


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CASES))
    return path


def run(capsys, *args):
    code = main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_paired_table(capsys, servers, dataset):
    code, out, err = run(capsys, "--dataset", str(dataset), "--stable", servers["stable"],
                         "--candidate", servers["candidate"], "--scorer", "exact_match",
                         "--scorer", "exact_match:lowercase=true,strip_punctuation=true")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"dataset {dataset}: 4 of 4 cases"
    assert lines[1] == f"stable:    {servers['stable']}  model tiny"  # the model each server lists
    rows = {re.split(r"\s{2,}", line.strip())[0]: line.split() for line in lines[4:]}
    # stable: add, other, label right; "Paris." only under the lenient scorer. candidate: only "other".
    assert rows["score (exact_match)"][-3:] == ["0.750", "0.250", "-0.500"]
    assert rows["exact_match_2"][-3:] == ["1.000", "0.667", "-0.333"]
    assert rows["json_field"][-3:] == ["1.000", "0.000", "-1.000"]
    assert "p95 latency" in out and "error rate" in out and "0.0% (0/4)" in out


def test_single_endpoint_json_and_sample(capsys, servers, dataset):
    code, out, err = run(capsys, "--dataset", str(dataset), "--endpoint", servers["candidate"] + "/v1",
                         "--model", "tiny", "--sample", "2", "--seed", "7", "--json", "--concurrency", "1")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["n"] == 2 and doc["cases_total"] == 4 and doc["seed"] == "7"
    assert doc["endpoint"]["model"] == "tiny" and doc["endpoint"]["error_rate"] == 0.0
    assert len(doc["cases"]) == 2 and doc["scorers"] == [{"type": "exact_match", "name": "exact_match", "normalize": ["strip"]}]
    again = json.loads(run(capsys, "--dataset", str(dataset), "--endpoint", servers["candidate"], "--sample", "2",
                           "--seed", "7", "--json")[1])
    assert [c["id"] for c in again["cases"]] == [c["id"] for c in doc["cases"]]


def test_paired_json(capsys, servers, dataset):
    code, out, err = run(capsys, "--dataset", str(dataset), "--stable", servers["stable"], "--candidate",
                         servers["candidate"], "--json", "--timeout", "5")
    doc = json.loads(out)
    assert doc["stable"]["score"] == 0.75 and doc["candidate"]["score"] == 0.25 and doc["difference"] == -0.5
    assert doc["candidate"]["url"] == servers["candidate"] and doc["candidate"]["p95_latency_s"] >= 0.03
    assert {c["id"]: c["candidate"]["text"] for c in doc["cases"]}["add"] == "5"


def test_s3_dataset(capsys, servers, monkeypatch):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="evals")
        s3.put_object(Bucket="evals", Key="cases.jsonl", Body="".join(json.dumps(c) + "\n" for c in CASES).encode())
        code, out, err = run(capsys, "--dataset", "s3://evals/cases.jsonl", "--endpoint", servers["stable"], "--json")
        assert code == 0, err
        assert json.loads(out)["endpoint"]["score"] == 0.75
        code, out, err = run(capsys, "--dataset", "s3://evals/nope.jsonl", "--endpoint", servers["stable"])
        assert code == 2 and "NoSuchKey" in err


def test_bad_input(capsys, servers, dataset, tmp_path):
    code, _, err = run(capsys, "--dataset", str(dataset), "--endpoint", servers["stable"], "--scorer", "fuzzy")
    assert code == 2 and "unknown scorer type 'fuzzy'" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CASES[0]) + "\n" + '{"prompt": "x"}\n')
    code, _, err = run(capsys, "--dataset", str(bad), "--endpoint", servers["stable"])
    assert code == 2 and f"{bad} line 2: exact_match: exact_match needs an expected answer" in err
    code, _, err = run(capsys, "--dataset", str(tmp_path / "missing.jsonl"), "--endpoint", servers["stable"])
    assert code == 2 and "cannot read" in err
    for args in (["--stable", servers["stable"]], ["--endpoint", servers["stable"], "--candidate", servers["stable"]],
                 ["--endpoint", "127.0.0.1:8000"], []):
        with pytest.raises(SystemExit) as exc:
            main(["eval", "--dataset", str(dataset), *args])
        assert exc.value.code == 2
    capsys.readouterr()


def test_unreachable_endpoints(capsys, dataset):
    nowhere = f"http://127.0.0.1:{free_port()}"
    code, _, err = run(capsys, "--dataset", str(dataset), "--endpoint", nowhere, "--timeout", "2")
    assert code == 1 and "/v1/models" in err  # it could not ask which model is served
    code, out, err = run(capsys, "--dataset", str(dataset), "--endpoint", nowhere, "--model", "tiny", "--timeout", "2")
    assert code == 1 and "100.0% (4/4: connection 4)" in out
