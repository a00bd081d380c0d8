"""The SmallModel API: parsing at the edge and the CRD generated from the models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from slmfleet.api.conditions import Condition, set_condition
from slmfleet.api.crd import MODELROLLOUT, SMALLMODEL, crd, rendered_files
from slmfleet.api.smallmodel import SmallModel
from slmfleet.cli.crds import main as crds_main

REPO = Path(__file__).resolve().parents[1]
DIGEST = "sha256:" + "ab" * 32

QWEN_05B = {
    "modelType": "qwen2", "numHiddenLayers": 24, "hiddenSize": 896, "numAttentionHeads": 14,
    "numKeyValueHeads": 2, "vocabSize": 151936, "intermediateSize": 4864, "tieWordEmbeddings": True,
    "maxPositionEmbeddings": 32768,
}


def body(**spec) -> dict:
    return {
        "apiVersion": "slmfleet.io/v1alpha1", "kind": "SmallModel",
        "metadata": {"name": "m", "namespace": "ns", "generation": 1},
        "spec": {"source": {"uri": "pvc://weights/qwen", "digest": DIGEST}, "architecture": QWEN_05B, **spec},
    }


def test_crds_directory_matches_the_models():
    for name, text in rendered_files().items():
        on_disk = (REPO / "crds" / name).read_text()
        assert on_disk == text, f"crds/{name} is stale: run `make crds`"
    assert crds_main(["--out", str(REPO / "crds"), "--check"]) == 0


def test_drift_check_fails_on_an_edited_crd(tmp_path):
    crds_main(["--out", str(tmp_path)])
    path = tmp_path / "smallmodels.slmfleet.io.yaml"
    path.write_text(path.read_text().replace("shortNames:\n    - sm", "shortNames:\n    - smx"))
    assert crds_main(["--out", str(tmp_path), "--check"]) == 1


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, prop in (schema.get("properties") or {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("spec", [MODELROLLOUT])
def test_every_crd_is_structural(spec):
    schema = crd(spec)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        assert not {"$ref", "anyOf", "allOf", "title"} & node.keys(), f"{path} is not structural"
        assert node.get("additionalProperties") is not True, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(bound, True), bool), f"{path}.{bound} must be a boolean in OpenAPI v3.0"


def test_schema_is_structural_and_explained():
    doc = crd(SMALLMODEL)
    version = doc["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, f"{path} has no type"
        assert not {"$ref", "anyOf", "allOf", "title"} & node.keys(), f"{path} is not structural"
        if path.startswith(".spec") and path.count(".") <= 3 and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description for kubectl explain"
        if path.startswith(".status"):
            assert "default" not in node, f"{path}: status fields must not be defaulted"
    assert version["subresources"] == {"status": {}}
    assert doc["spec"]["names"]["shortNames"] == ["sm"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["GPU"] == ".status.placement.summary"
    assert columns["TP"] == ".status.placement.tensorParallelSize"
    assert columns["Ready"] == ".status.readyReplicas"
    assert columns["Revision"] == ".status.revision"
    digest = schema["properties"]["spec"]["properties"]["source"]["properties"]["digest"]
    assert digest["pattern"] == "^sha256:[0-9a-f]{64}$"
    assert yaml.safe_load(rendered_files()["smallmodels.slmfleet.io.yaml"]) == doc


def test_parse_uses_camel_case_and_defaults():
    model = SmallModel.model_validate(body(serving={"maxModelLen": 8192, "extraArgs": ["--enable-prefix-caching"]}))
    assert model.spec.serving.max_model_len == 8192
    assert model.spec.serving.concurrency == 8
    assert model.spec.architecture.to_hf_config()["num_key_value_heads"] == 2
    with pytest.raises(ValidationError):
        model.spec.serving.replicas = 3  # frozen


@pytest.mark.parametrize(
    "spec",
    [
        {"source": {"uri": "pvc://weights/q", "digest": "sha256:abc"}},
        {"source": {"uri": "http://example/", "digest": DIGEST}},
        {"serving": {"dtype": "int4"}},
        {"serving": {"concurrency": 0}},
        {"resources": {"gpuCount": 9}},
        {"resources": {"maxGpuMemoryUtilization": 0.99}},
    ],
)
def test_pydantic_rejects_what_the_schema_rejects(spec):
    with pytest.raises(ValidationError):
        SmallModel.model_validate(body(**spec))


def test_condition_transition_time_moves_only_on_status_change():
    ready = Condition(type="Ready", status="False", reason="Waiting")
    first = set_condition([], ready, "2026-01-01T00:00:00Z")
    same = set_condition(first, ready.model_copy(update={"message": "still"}), "2026-01-01T00:01:00Z")
    assert same[0].last_transition_time == "2026-01-01T00:00:00Z"
    flipped = set_condition(same, ready.model_copy(update={"status": "True"}), "2026-01-01T00:02:00Z")
    assert flipped[0].last_transition_time == "2026-01-01T00:02:00Z"


def test_yaml_11_boolean_words_are_quoted_for_kubectl():
    # `required: [n]` reads as [false] to YAML 1.1 parsers such as kubectl's; the CRD would not apply.
    text = rendered_files()["modelrollouts.slmfleet.io.yaml"]
    assert "- 'n'" in text and "\n                  - n\n" not in text
