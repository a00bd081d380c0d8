"""OperatorConfig: the operator's own settings file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from slmfleet.api.config import CHART_COMPUTED_FIELDS, OperatorConfig, chart_values_schema, parse_operator_config

REPO = Path(__file__).resolve().parents[1]
DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_parses_camel_case_yaml():
    config = parse_operator_config(f"""
vllmImage: registry.internal:5000/mirror/vllm/vllm-openai:v0.32.0@{DIGEST}
loaderImage: registry.internal:5000/mirror/slmfleet/slmfleet:0.1.0@{DIGEST}
imagePullPolicy: Always
pendingTimeoutSeconds: 120
startupTimeoutSeconds: 900
namespaces: [models, team-a]
vllmPort: 8080
""")
    assert config == OperatorConfig(
        vllm_image=f"registry.internal:5000/mirror/vllm/vllm-openai:v0.32.0@{DIGEST}",
        loader_image=f"registry.internal:5000/mirror/slmfleet/slmfleet:0.1.0@{DIGEST}",
        image_pull_policy="Always",
        pending_timeout_seconds=120,
        startup_timeout_seconds=900,
        namespaces=["models", "team-a"],
        vllm_port=8080,
    )


def test_defaults():
    config = parse_operator_config(f"vllmImage: vllm/vllm-openai@{DIGEST}\nloaderImage: slmfleet/slmfleet@{DIGEST}\n")
    assert config.image_pull_policy == "IfNotPresent"
    assert config.pending_timeout_seconds == 300
    assert config.startup_timeout_seconds == 1800
    assert config.namespaces == []
    assert config.vllm_port == 8000


@pytest.mark.parametrize("image", [
    "vllm/vllm-openai:v0.32.0",                      # a tag moves
    "vllm/vllm-openai:latest",
    "vllm/vllm-openai@sha256:1234",                  # truncated digest
    f"vllm/vllm-openai@{DIGEST.upper()}",
    f"vllm/vllm-openai:v0.32.0@{DIGEST} ",
    f"vllm/vllm-openai:v0.32.0@sha512:{'a' * 128}",
])
def test_rejects_an_image_not_pinned_by_digest(image):
    with pytest.raises(ValidationError, match="vllmImage"):
        OperatorConfig.model_validate({"vllmImage": image, "loaderImage": "slmfleet/slmfleet@" + DIGEST})


def test_the_image_is_required():
    with pytest.raises(ValidationError, match="vllmImage"):
        parse_operator_config("vllmPort: 8000\n")
    with pytest.raises(ValidationError):
        parse_operator_config("")


def test_a_misspelt_key_fails_instead_of_falling_back_to_a_default():
    with pytest.raises(ValidationError, match="startupTimeout"):
        parse_operator_config(
            f"vllmImage: vllm/vllm-openai@{DIGEST}\nloaderImage: slmfleet/slmfleet@{DIGEST}\nstartupTimeout: 60\n"
        )


@pytest.mark.parametrize("field, value", [
    ("vllmPort", 80), ("pendingTimeoutSeconds", 0), ("namespaces", ["Not_A_Namespace"]),
    ("imagePullPolicy", "Sometimes"),
])
def test_rejects_bad_values(field, value):
    with pytest.raises(ValidationError):
        OperatorConfig.model_validate({"vllmImage": f"vllm/vllm-openai@{DIGEST}", field: value})


def test_image_pull_secrets():
    base = {"vllmImage": f"vllm/vllm-openai@{DIGEST}", "loaderImage": f"slmfleet/slmfleet@{DIGEST}"}
    assert OperatorConfig.model_validate(base).image_pull_secrets == []
    config = parse_operator_config(f"vllmImage: vllm/vllm-openai@{DIGEST}\nloaderImage: slmfleet/slmfleet@{DIGEST}\n"
                                   "imagePullSecrets: [mirror-pull, registry.example.com]\n")
    assert config.image_pull_secrets == ["mirror-pull", "registry.example.com"]


@pytest.mark.parametrize("secrets", [
    ["Mirror"], ["-mirror"], ["mirror-"], ["a..b"], ["a" * 254], [""], ["mirror_pull"],
    [f"s{i}" for i in range(17)],                      # bounded
])
def test_image_pull_secrets_must_be_secret_names(secrets):
    with pytest.raises(ValidationError, match="imagePullSecrets"):
        OperatorConfig.model_validate({"vllmImage": f"vllm/vllm-openai@{DIGEST}",
                                       "loaderImage": f"slmfleet/slmfleet@{DIGEST}", "imagePullSecrets": secrets})


def test_chart_values_schema_is_the_config_without_what_the_chart_computes():
    schema = chart_values_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(OperatorConfig.model_json_schema(by_alias=True)["properties"]) - set(
        CHART_COMPUTED_FIELDS)
    assert "required" not in schema  # every remaining field has a default
    assert schema["properties"]["vllmPort"] == {
        "default": 8000, "description": schema["properties"]["vllmPort"]["description"],
        "maximum": 65535, "minimum": 1024, "type": "integer"}
    assert "$ref" not in json.dumps(schema) and "title" not in json.dumps(schema)


def test_config_is_frozen():
    config = OperatorConfig(vllm_image=f"vllm/vllm-openai@{DIGEST}", loader_image=f"slmfleet/slmfleet@{DIGEST}")
    with pytest.raises(ValidationError):
        config.vllm_port = 9000


def test_the_local_clusters_config_is_valid_once_the_built_images_are_added():
    from e2e.operator_proc import CONFIG, local_config

    template = CONFIG.read_text()
    # No image reference, so no digest anyone could copy: the built images' digests are added.
    assert "sha256:" not in template and "Image:" not in template
    registry = "127.0.0.1:16449"
    config = parse_operator_config(local_config(
        template, f"{registry}/slmfleet/vllm-standin-test:0.1.0@{DIGEST}", f"{registry}/slmfleet/slmfleet:0.1.0@{DIGEST}"))
    assert config.vllm_image.startswith(registry) and config.loader_image.startswith(registry)
    assert config.deprecations is not None
