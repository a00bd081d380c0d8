"""Hostile tenants (issue 13) on the real local control plane: what a SmallModel or ModelRollout
names cannot make the operator send a Secret anywhere, connect where the platform did not allow,
or echo a secret value. Each case asserts the condition, that no connection reached the endpoint
it named (a loopback listener counts them), and that no marker value appears in status, Events,
the operator's log or /metrics."""

from __future__ import annotations

import json
import uuid

import pytest

from e2e.operator_proc import metrics
from e2e.tests.test_concurrency import Tarpit
from e2e.tests.test_rollout import rollout
from e2e.tests.test_smallmodel import GROUP, QWEN_05B, VERSION, condition, create, model_body, wait_condition
from e2e.wait import wait_for

MARKER = f"MARKER-{uuid.uuid4().hex[:12]}"
PEM_MARKER = f"-----BEGIN PRIVATE KEY-----\nMII{MARKER}\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def allowed_listener():
    """Counts connections on 127.0.0.1, which the local cluster's s3Endpoints allow (e2e/operator-config.yaml)."""
    listener = Tarpit("127.0.0.1")
    yield listener
    listener.close()


@pytest.fixture
def refused_listener():
    """On 127.0.0.2: loopback too, but on no allow-list."""
    listener = Tarpit("127.0.0.2")
    yield listener
    listener.close()


def secret(core, namespace: str, name: str, values: dict[str, str], labels: dict[str, str] | None = None,
           annotations: dict[str, str] | None = None) -> None:
    core.create_namespaced_secret(namespace, {"metadata": {"name": name, "labels": labels or {},
                                                           "annotations": annotations or {}},
                                              "stringData": values})


def s3_model(name: str, endpoint: str | None, secret_name: str | None = None) -> dict:
    body = model_body(name, QWEN_05B, serving={"maxModelLen": 4096})
    s3: dict = {}
    if endpoint is not None:
        s3["endpoint"] = endpoint
    if secret_name is not None:
        s3["credentialsSecret"] = {"name": secret_name}
    body["spec"]["source"] = {"uri": "s3://models/qwen/", "digest": body["spec"]["source"]["digest"], "s3": s3}
    return body


def assert_no_marker(operator, crs, core, namespace: str) -> None:
    """No marker value anywhere a tenant or the platform team could read it."""
    places = {
        "status": json.dumps([o.get("status") for plural in ("smallmodels", "modelrollouts") for o in
                              crs.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]]),
        "events": json.dumps([e.message for e in core.list_namespaced_event(namespace).items]),
        "operator log": operator.log_text(),
        "/metrics": json.dumps(metrics(operator.url)),
        "termination messages": json.dumps([str(s.state) for p in core.list_namespaced_pod(namespace).items
                                            for s in (p.status.init_container_statuses or [])]),
    }
    for where, text in places.items():
        assert MARKER not in text, f"the marker reached the {where}"


def assert_no_deployment(apps, namespace: str) -> None:
    assert apps.list_namespaced_deployment(namespace).items == [], "no pods that would carry the Secret"


ENDPOINTS = {
    "plain http to a host not allowed": "http://127.0.0.2:{port}",
    "https to a host not allowed": "https://127.0.0.2:{port}",
    "AWS (no endpoint), not allowed": None,
}


@pytest.mark.parametrize("what", list(ENDPOINTS))
def test_an_s3_endpoint_the_platform_did_not_allow_is_refused_before_any_connection(
        what, operator, crs, core, apps, namespace, refused_listener):
    secret(core, namespace, "creds", {"AWS_ACCESS_KEY_ID": MARKER, "AWS_SECRET_ACCESS_KEY": MARKER},
           labels={"slmfleet.io/s3-credentials": "true"})
    template = ENDPOINTS[what]
    endpoint = template.format(port=refused_listener.port) if template else None
    create(crs, namespace, s3_model("remote", endpoint, "creds"))
    model = wait_condition(crs, namespace, "remote", "Degraded", "True", "EndpointNotAllowed")
    assert "s3Endpoints" in condition(model, "Degraded")["message"]
    assert not refused_listener.held
    assert_no_deployment(apps, namespace)
    assert_no_marker(operator, crs, core, namespace)


CREDENTIALS = {
    "a one-line value of a Secret that did not opt in": ({"AWS_ACCESS_KEY_ID": MARKER, "AWS_SECRET_ACCESS_KEY": "x"},
                                                         {}, {}, "not labelled"),
    "a private key of a Secret that did not opt in": ({"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": PEM_MARKER},
                                                      {}, {}, "not labelled"),
    "a Secret that allows other hosts only": ({"AWS_ACCESS_KEY_ID": MARKER, "AWS_SECRET_ACCESS_KEY": MARKER},
                                              {"slmfleet.io/s3-credentials": "true"},
                                              {"slmfleet.io/s3-endpoints": "minio.storage.svc, *.example.com"},
                                              "does not allow this endpoint"),
}


@pytest.mark.parametrize("what", list(CREDENTIALS))
def test_a_secret_is_sent_only_if_it_opted_in_for_that_endpoint(
        what, operator, crs, core, apps, namespace, allowed_listener):
    values, labels, annotations, message = CREDENTIALS[what]
    secret(core, namespace, "db-password", values, labels, annotations)
    create(crs, namespace, s3_model("steal", f"http://127.0.0.1:{allowed_listener.port}", "db-password"))
    model = wait_condition(crs, namespace, "steal", "Degraded", "True", "CredentialsNotAllowed")
    assert message in condition(model, "Degraded")["message"]
    assert not allowed_listener.held, "nothing was sent, not even a request without the Secret"
    assert_no_deployment(apps, namespace)
    assert_no_marker(operator, crs, core, namespace)


SCORERS = {
    "a regex RE2 cannot run (backreference)": {"type": "regex", "pattern": "(a+)\\1"},
    "a JSON Schema with a remote $ref": {"type": "jsonSchema",
                                         "schema": {"$ref": "http://127.0.0.2:{port}/schema.json"}},
}


@pytest.mark.parametrize("what", list(SCORERS))
def test_a_rollout_with_a_scorer_that_could_hurt_is_refused_when_parsed(
        what, operator, crs, core, namespace, refused_listener):
    create(crs, namespace, model_body("victim", QWEN_05B, serving={"maxModelLen": 4096}))
    scorer = json.loads(json.dumps(SCORERS[what]).replace("{port}", str(refused_listener.port)))
    body = rollout("hurt", "victim", [{"setWeight": 50}])
    body["spec"]["evaluation"]["scorers"] = [scorer]
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, "modelrollouts", body)

    def invalid():
        obj = crs.get_namespaced_custom_object(GROUP, VERSION, namespace, "modelrollouts", "hurt")
        degraded = condition(obj, "Degraded")
        return obj if degraded.get("status") == "True" and degraded.get("reason") == "InvalidSpec" else None

    obj = wait_for(invalid, 60, 0.3, "the rollout Degraded/InvalidSpec")
    assert "scorers" in condition(obj, "Degraded")["message"]
    assert not refused_listener.held, "the schema's $ref was never fetched"
    # The model itself is placed and deployed as if no rollout governed it.
    victim = wait_condition(crs, namespace, "victim", "Degraded", "False", "AsExpected")
    assert victim["status"].get("placement")
