"""What a ModelRollout says (API models) is what the evaluation layer runs: every scorer type and
dataset form of the CRD builds, and scores as its description promises."""

from __future__ import annotations

import pytest

from slmfleet.api.modelrollout import Evaluation, ModelRollout
from slmfleet.evaluation.dataset import parse_cases, sample
from slmfleet.evaluation.scorers import build_scorers

ROLLOUT = {
    "apiVersion": "slmfleet.io/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "r", "namespace": "ns"},
    "spec": {
        "modelRef": {"name": "qwen"},
        "steps": [{"evaluate": {}}, {"setWeight": 10}, {"pause": {"duration": "2m"}}, {"setWeight": 100}],
        "evaluation": {
            "dataset": {"inline": [
                {"prompt": "Capital of France?", "expected": "Paris"},
                {"messages": [{"role": "user", "content": "Sentiment: great!"}], "expected": '{"label": "positive"}'},
            ]},
            "scorers": [
                {"type": "exactMatch", "normalize": ["lowercase", "strip", "stripPunctuation"]},
                {"type": "contains"},
                {"type": "regex", "pattern": "^{expected}$"},
                {"type": "jsonSchema", "schema": {"type": "object", "required": ["label"]}},
                {"type": "jsonField", "field": "label"},
            ],
        },
    },
}


def api_scorers(rollout: ModelRollout):
    return build_scorers(s.model_dump(by_alias=True, exclude_none=True) for s in rollout.spec.evaluation.scorers)


def test_every_scorer_type_of_the_api_builds_and_scores():
    rollout = ModelRollout.model_validate(ROLLOUT)
    exact, contains, regex, schema, field = api_scorers(rollout)
    assert exact.score(" paris. ", "Paris") == 1.0 and exact.score("Lyon", "Paris") == 0.0
    assert contains.score("It is Paris, of course", "Paris") == 1.0
    assert regex.score("Paris", "Paris") == 1.0 and regex.score("Paris!", "Paris") == 0.0
    assert schema.score('{"label": "positive"}', "") == 1.0 and schema.score('{"x": 1}', "") == 0.0
    assert field.score('{"label": "positive"}', "positive") == 1.0


def test_inline_cases_of_the_api_parse_and_sample_deterministically():
    rollout = ModelRollout.model_validate(ROLLOUT)
    cases = parse_cases(rollout.spec.evaluation.dataset.inline)
    assert [c.kind for c in cases] == ["completion", "chat"]
    assert sample(cases, 1, "seed") == sample(list(reversed(cases)), 1, "seed")


@pytest.mark.parametrize("field", ["sample_size", "concurrency", "request_timeout_seconds", "confidence"])
def test_evaluation_settings_have_defaults(field):
    evaluation = Evaluation.model_validate(ROLLOUT["spec"]["evaluation"])
    assert getattr(evaluation, field) is not None
