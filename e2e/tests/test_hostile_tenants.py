"""Hostile tenants (issue 13) on the real local control plane: one case per abuse a tenant who can
create SmallModels and ModelRollouts in their namespace could try, and its variants. Each case
asserts the clear condition or admission error; that no marker value reaches status, Events, the
operator's log, termination messages or /metrics; that nothing connected where the platform did
not allow (loopback listeners count connections); and that a bystander model in another namespace
still has a spec change applied while the attack stands (e2e/bystander.py; the latency ratio
against a quiet operator is measured in test_tenant_isolation_ratio.py)."""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from kubernetes.client.exceptions import ApiException

from e2e.bystander import Bystander
from e2e.hostile_store import Answer, HostileStore
from e2e.operator_proc import metrics
from e2e.tests.test_concurrency import Tarpit
from e2e.tests.test_rollout import NO_DEPRECATIONS, rollout
from e2e.tests.test_smallmodel import (
    GROUP,
    PLURAL,
    QWEN_05B,
    TENANT_FLAG_REFUSED,
    VERSION,
    condition,
    create,
    events_for,
    get,
    model_body,
    wait_condition,
)
from e2e.tests.test_weights import model_files
from e2e.wait import wait_for
from slmfleet.weights.manifest import MANIFEST_NAME, FileEntry, Manifest

MARKER = f"MARKER-{uuid.uuid4().hex[:12]}"
PEM_MARKER = f"-----BEGIN PRIVATE KEY-----\nMII{MARKER}\n-----END PRIVATE KEY-----\n"
CREDENTIALS_LABEL = {"slmfleet.io/s3-credentials": "true"}


@pytest.fixture(scope="module")
def bystander(api, operator) -> Iterator[Bystander]:
    """Another team's model, in a namespace of its own, for the whole module."""
    model = Bystander(api).start()
    yield model
    model.stop()


@pytest.fixture
def still_reconciled(bystander) -> Iterator[None]:
    """After the case's own checks, while its objects still stand: the bystander's next change is
    applied (a stalled operator fails the wait; the time is not asserted)."""
    yield
    bystander.change_applied()


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


def s3_model(name: str, endpoint: str | None, secret_name: str | None = None, uri: str = "s3://models/qwen/",
             digest: str | None = None, **secret_keys: str) -> dict:
    body = model_body(name, QWEN_05B, serving={"maxModelLen": 4096})
    s3: dict = {}
    if endpoint is not None:
        s3["endpoint"] = endpoint
    if secret_name is not None:
        s3["credentialsSecret"] = {"name": secret_name, **secret_keys}
    body["spec"]["source"] = {"uri": uri, "digest": digest or body["spec"]["source"]["digest"], "s3": s3}
    return body


def assert_no_marker(operator, crs, core, namespace: str) -> None:
    """No marker value anywhere a tenant or the platform team could read it."""
    places = {
        "status": json.dumps([o.get("status") for plural in ("smallmodels", "modelrollouts") for o in
                              crs.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]]),
        "events": json.dumps([e.message for e in core.list_namespaced_event(namespace).items]),
        "operator log": operator.log_text(),
        "/metrics": json.dumps(metrics(operator.url)),
        "termination messages": json.dumps([f"{s.state} {s.last_state}" for p in core.list_namespaced_pod(namespace).items
                                            for s in [*(p.status.init_container_statuses or []),
                                                      *(p.status.container_statuses or [])]]),
    }
    for where, text in places.items():
        assert MARKER not in text, f"the marker reached the {where}"


def assert_no_deployment(apps, namespace: str) -> None:
    assert apps.list_namespaced_deployment(namespace).items == [], "no pods that would carry the Secret"


def weights_problem(crs, namespace: str, name: str, reason: str, timeout: float = 90) -> dict:
    """The model once its weights were read and refused for `reason` (Degraded says it whether the
    problem may heal or not; WeightsVerified only for a verdict on the pinned bytes)."""
    return wait_condition(crs, namespace, name, "Degraded", "True", reason, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Endpoints: only what the platform team allowed, refused before any connection.

ENDPOINTS = {
    "plain http to a host not allowed": ("http://127.0.0.2:{port}", "refused"),
    "https to a host not allowed": ("https://127.0.0.2:{port}", "refused"),
    "AWS (no endpoint), not allowed": (None, "refused"),
    # The rules name hosts: a name that resolves to an allowed address is not that address.
    "a host name that resolves to an allowed address": ("http://localhost:{port}", "allowed"),
}


@pytest.mark.parametrize("what", list(ENDPOINTS))
def test_an_s3_endpoint_the_platform_did_not_allow_is_refused_before_any_connection(
        what, operator, crs, core, apps, namespace, refused_listener, allowed_listener, still_reconciled):
    secret(core, namespace, "creds", {"AWS_ACCESS_KEY_ID": MARKER, "AWS_SECRET_ACCESS_KEY": MARKER},
           labels=CREDENTIALS_LABEL)
    template, listening = ENDPOINTS[what]
    listener = refused_listener if listening == "refused" else allowed_listener
    endpoint = template.format(port=listener.port) if template else None
    create(crs, namespace, s3_model("remote", endpoint, "creds"))
    model = wait_condition(crs, namespace, "remote", "Degraded", "True", "EndpointNotAllowed")
    assert "s3Endpoints" in condition(model, "Degraded")["message"]
    assert not listener.held
    assert_no_deployment(apps, namespace)
    assert_no_marker(operator, crs, core, namespace)


# ---------------------------------------------------------------------------------------------
# Credentials: only a Secret that opted in, for that endpoint, under the keys it declares.

CREDENTIALS = {
    "a one-line value of a Secret that did not opt in": (
        {"AWS_ACCESS_KEY_ID": MARKER, "AWS_SECRET_ACCESS_KEY": "x"}, {}, {}, {}, "not labelled"),
    "a private key of a Secret that did not opt in": (
        {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": PEM_MARKER}, {}, {}, {}, "not labelled"),
    "a Secret that allows other hosts only": (
        {"AWS_ACCESS_KEY_ID": MARKER, "AWS_SECRET_ACCESS_KEY": MARKER}, CREDENTIALS_LABEL,
        {"slmfleet.io/s3-endpoints": "minio.storage.svc, *.example.com"}, {}, "does not allow this endpoint"),
    "other keys of an opted-in Secret than it declares": (
        {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s", "password": MARKER, "tls.key": PEM_MARKER},
        CREDENTIALS_LABEL, {}, {"accessKeyIdKey": "password", "secretAccessKeyKey": "tls.key"},
        "slmfleet.io/s3-credential-keys"),
}


@pytest.mark.parametrize("what", list(CREDENTIALS))
def test_a_secret_is_sent_only_if_it_opted_in_for_that_endpoint(
        what, operator, crs, core, apps, namespace, allowed_listener, still_reconciled):
    values, labels, annotations, keys, message = CREDENTIALS[what]
    secret(core, namespace, "db-password", values, labels, annotations)
    create(crs, namespace, s3_model("steal", f"http://127.0.0.1:{allowed_listener.port}", "db-password", **keys))
    model = wait_condition(crs, namespace, "steal", "Degraded", "True", "CredentialsNotAllowed")
    assert message in condition(model, "Degraded")["message"]
    assert not allowed_listener.held, "nothing was sent, not even a request without the Secret"
    assert_no_deployment(apps, namespace)
    assert_no_marker(operator, crs, core, namespace)


def test_a_secret_key_name_that_no_secret_can_have_is_refused_at_admission(crs, namespace, still_reconciled):
    with pytest.raises(ApiException) as err:
        create(crs, namespace, s3_model("keys", "http://127.0.0.1:9", "creds", accessKeyIdKey="../token"))
    assert err.value.status == 422
    assert "accessKeyIdKey" in json.loads(err.value.body)["message"]


# ---------------------------------------------------------------------------------------------
# A store the tenant controls: what it answers is bounded and never echoed.

CONFIG_JSON = json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}).encode()


def pinned(files: dict[str, bytes], sizes: dict[str, int] | None = None) -> tuple[bytes, str]:
    """A manifest of `files` (their sizes overridden by `sizes`) and its digest, as `slmfleet pin` makes them."""
    manifest = Manifest.of(FileEntry(path, (sizes or {}).get(path, len(data)), hashlib.sha256(data).hexdigest())
                           for path, data in files.items())
    return manifest.canonical_bytes, manifest.digest


def safetensors_header_claiming(length: int, sent: bytes = b"") -> bytes:
    """A safetensors file whose first 8 bytes say its JSON header is `length` bytes long."""
    return struct.pack("<Q", length) + sent


def store_model(name: str, store: HostileStore, digest: str | None = None) -> dict:
    return s3_model(name, store.endpoint, "creds", uri="s3://models/qwen/", digest=digest)


@contextmanager
def hostile_store(core, namespace: str, answers: dict[str, Answer], **behaviour) -> Iterator[HostileStore]:
    secret(core, namespace, "creds", {"AWS_ACCESS_KEY_ID": "tenant", "AWS_SECRET_ACCESS_KEY": "tenant-secret"},
           labels=CREDENTIALS_LABEL)
    store = HostileStore(answers, **behaviour)
    try:
        yield store
    finally:
        store.close()


MANIFEST_PATH = f"/models/qwen/{MANIFEST_NAME}"
# What a capped reader may take of an endless body: the cap (16 MiB for a manifest) plus what the
# sockets' buffers hold when it hangs up.
READ_CEILING = 48 * 1024 * 1024


def test_an_s3_error_whose_text_carries_a_secret_shows_only_its_code(
        operator, crs, core, apps, namespace, still_reconciled):
    answers = {MANIFEST_PATH: Answer(error=(403, "AccessDenied", f"denied for {MARKER} {PEM_MARKER}"))}
    with hostile_store(core, namespace, answers) as store:
        create(crs, namespace, store_model("denied", store))
        model = weights_problem(crs, namespace, "denied", "StorageDenied")
        assert "AccessDenied (HTTP 403)" in condition(model, "Degraded")["message"]
        assert store.tally.requests >= 1
    assert_no_deployment(apps, namespace)
    assert_no_marker(operator, crs, core, namespace)


def test_a_manifest_streamed_without_end_is_read_up_to_its_cap(operator, crs, core, apps, namespace,
                                                               still_reconciled):
    with hostile_store(core, namespace, {MANIFEST_PATH: Answer(endless=True, filler=MARKER.encode())}) as store:
        create(crs, namespace, store_model("endless", store))
        model = weights_problem(crs, namespace, "endless", "WeightsUnreadable")
        assert "slmfleet-manifest.json is larger than 16777216 bytes" in condition(model, "Degraded")["message"]
        assert store.tally.bytes_sent < READ_CEILING, f"{store.tally.bytes_sent} bytes read of an endless manifest"
    assert_no_deployment(apps, namespace)
    assert_no_marker(operator, crs, core, namespace)


def test_a_config_json_streamed_without_end_is_read_up_to_its_cap(operator, crs, core, apps, namespace,
                                                                  still_reconciled):
    manifest, digest = pinned({"config.json": CONFIG_JSON})
    answers = {MANIFEST_PATH: Answer(manifest),
               "/models/qwen/config.json": Answer(endless=True, filler=MARKER.encode())}
    with hostile_store(core, namespace, answers) as store:
        create(crs, namespace, store_model("endless-config", store, digest))
        model = weights_problem(crs, namespace, "endless-config", "WeightsUnreadable")
        assert "config.json is larger than 16777216 bytes" in condition(model, "Degraded")["message"]
        assert store.tally.bytes_sent < READ_CEILING + len(manifest)
    assert_no_deployment(apps, namespace)
    assert_no_marker(operator, crs, core, namespace)


def test_a_safetensors_header_claiming_a_gigabyte_is_refused_without_reading_it(
        operator, crs, core, apps, namespace, still_reconciled):
    weights = safetensors_header_claiming(1 << 30, b"{" + MARKER.encode() * 1000)
    manifest, digest = pinned({"config.json": CONFIG_JSON, "model.safetensors": weights})
    answers = {MANIFEST_PATH: Answer(manifest), "/models/qwen/config.json": Answer(CONFIG_JSON),
               "/models/qwen/model.safetensors": Answer(weights)}
    with hostile_store(core, namespace, answers) as store:
        create(crs, namespace, store_model("huge-header", store, digest))
        model = weights_problem(crs, namespace, "huge-header", "WeightsUnreadable")
        assert "header length 1073741824 exceeds 16777216 bytes" in condition(model, "Degraded")["message"]
        assert store.tally.bytes_sent < len(manifest) + len(CONFIG_JSON) + len(weights) + 1024
    assert_no_deployment(apps, namespace)
    assert_no_marker(operator, crs, core, namespace)


def test_a_store_that_ignores_range_sends_no_more_than_the_reader_takes(
        operator, crs, core, apps, namespace, still_reconciled):
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    # A valid file with 64 MiB of padding after the tensor: a header read gets the whole object.
    weights = struct.pack("<Q", len(header)) + header + bytes(32) + MARKER.encode() * (64 * 1024 * 1024 // len(MARKER))
    manifest, digest = pinned({"config.json": CONFIG_JSON, "model.safetensors": weights})
    answers = {MANIFEST_PATH: Answer(manifest), "/models/qwen/config.json": Answer(CONFIG_JSON),
               "/models/qwen/model.safetensors": Answer(weights, ignore_range=True)}
    with hostile_store(core, namespace, answers) as store:
        create(crs, namespace, store_model("no-range", store, digest))
        # The header is read and sized: the model is placed on what it says.
        wait_for(lambda: (get(crs, namespace, "no-range").get("status") or {}).get("placement"), 90, 0.3,
                 "the model placed on its weights' header")
        assert store.tally.bytes_sent < READ_CEILING + len(manifest), \
            f"{store.tally.bytes_sent} bytes sent for a header of {len(header)}"
    assert_no_marker(operator, crs, core, namespace)


def test_a_loader_the_store_turns_on_shows_only_the_error_code_in_its_termination_message(
        operator, crs, core, apps, namespace, process_nodes_free, still_reconciled):
    files = model_files()
    manifest, digest = pinned(files)
    answers = {MANIFEST_PATH: Answer(manifest), **{f"/models/qwen/{p}": Answer(data) for p, data in files.items()}}
    # The operator's own read (manifest, config.json, the header's length, the header) goes
    # through; the loader in the pod is denied, with the secret in the error's text.
    denial = Answer(error=(403, "AccessDenied", f"denied for {MARKER} {PEM_MARKER}"))
    with hostile_store(core, namespace, answers, deny_after=4, denial=denial) as store:
        body = store_model("turned", store, digest)
        body["spec"]["resources"] = {"nodeSelector": {"slmfleet.io/node-agent": "process"}}
        create(crs, namespace, body)
        model = wait_condition(crs, namespace, "turned", "WeightsVerified", "False", "StorageDenied", timeout=120)
        assert "AccessDenied (HTTP 403)" in condition(model, "WeightsVerified")["message"]
        assert store.tally.requests > 4, "the loader asked the store"
    terminated = [s.last_state.terminated or s.state.terminated for p in core.list_namespaced_pod(namespace).items
                  for s in p.status.init_container_statuses or []]
    assert any(t is not None and t.message for t in terminated), "the loader left a termination message"
    assert_no_marker(operator, crs, core, namespace)


# ---------------------------------------------------------------------------------------------
# Scorers: refused when the rollout is parsed, never run.

SCORERS = {
    "a regex RE2 cannot run (backreference)": {"type": "regex", "pattern": "(a+)\\1"},
    "a JSON Schema with a remote $ref": {"type": "jsonSchema",
                                         "schema": {"$ref": "http://127.0.0.2:{port}/schema.json"}},
    "a JSON Schema with a file $ref": {"type": "jsonSchema", "schema": {"$ref": "file:///etc/passwd"}},
    "an invalid JSON Schema": {"type": "jsonSchema", "schema": {"type": "no-such-type"}},
}


@pytest.mark.parametrize("what", list(SCORERS))
def test_a_rollout_with_a_scorer_that_could_hurt_is_refused_when_parsed(
        what, operator, crs, core, namespace, refused_listener, still_reconciled):
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


# ---------------------------------------------------------------------------------------------
# vLLM flags: admission refuses what no configuration allows; the operator what this one does not.

REFUSED_FLAGS = {
    "runs the weights' own Python code": ["--trust-remote-code"],
    "an abbreviation of a forbidden flag": ["--trust-remote"],
    "serves random weights (separate value)": ["--load-format", "dummy"],
    "serves random weights (joined value)": ["--load-format=dummy"],
    "sends traces to an endpoint of the tenant's": ["--otlp-traces-endpoint=http://127.0.0.2:{port}"],
    "lets requests read the node's files": ["--allowed-local-media-path", "/"],
    "locks the operator out of its own probes": ["--api-key", MARKER],
    "an abbreviation of a flag the operator sets (quantization)": ["--quantiz", "awq"],
    "an abbreviation of a flag the operator sets (kv cache dtype)": ["--kv-cache-dt=fp8"],
    "a flag the operator manages (tensor parallelism)": ["--tensor-parallel=4"],
    "vLLM 0.32's other name for --gpu-memory-utilization, abbreviated": ["--device-mem=0.99"],
    "loads a reasoning parser from a file": ["--reasoning-parser-plugin", "/tmp/parser.py"],
}


@pytest.mark.parametrize("what", list(REFUSED_FLAGS))
def test_a_vllm_flag_no_tenant_may_pass_is_refused_at_admission(
        what, operator, crs, core, apps, namespace, refused_listener, still_reconciled):
    args = [a.replace("{port}", str(refused_listener.port)) for a in REFUSED_FLAGS[what]]
    with pytest.raises(ApiException) as err:
        create(crs, namespace, model_body("flags-bad", QWEN_05B, serving={"extraArgs": args}))
    assert err.value.status == 422, args
    assert TENANT_FLAG_REFUSED in json.loads(err.value.body)["message"], (args, err.value.body)
    assert apps.list_namespaced_deployment(namespace).items == []
    assert not refused_listener.held
    assert_no_marker(operator, crs, core, namespace)


def test_a_flag_admission_lets_through_is_refused_by_the_operator_unless_allowed(
        operator, crs, apps, namespace, still_reconciled):
    # Allowed flags, an abbreviation of one and values, whatever they say, are admitted and served;
    # so is --reasoning-parser, though it begins the forbidden --reasoning-parser-plugin.
    create(crs, namespace, model_body("flags-ok", QWEN_05B, serving={
        "extraArgs": ["--enable-prefix", "--seed", "7", "--response-role=trust-remote-code",
                      "--reasoning-parser", "deepseek_r1"]}))
    # A vLLM flag admission lets through but the allow-list does not have: the operator refuses it.
    create(crs, namespace, model_body("flags-lora", QWEN_05B, serving={"extraArgs": ["--enable-lora"]}))
    obj = wait_condition(crs, namespace, "flags-lora", "Degraded", "True", "ExtraArgsRefused")
    assert "--enable-lora (not on the allow-list)" in condition(obj, "Degraded")["message"]

    def only_flags_ok_deployed() -> bool:
        revision = get(crs, namespace, "flags-ok").get("status", {}).get("revision")
        names = [d.metadata.name for d in apps.list_namespaced_deployment(namespace).items]
        return revision is not None and names == [f"flags-ok-{revision}"]

    wait_for(only_flags_ok_deployed, 60, what="a Deployment for flags-ok and none for flags-lora")


# ---------------------------------------------------------------------------------------------
# Ownership: a name collision leaves the other owner's object as it was.

def model_gone(crs, namespace: str, name: str) -> bool:
    try:
        get(crs, namespace, name)
    except ApiException as exc:
        return exc.status == 404
    return False


def test_a_model_named_like_another_owners_service_leaves_it_untouched(operator, crs, core, apps, namespace,
                                                                        still_reconciled):
    core.create_namespaced_service(namespace, {
        "metadata": {"name": "postgres", "labels": {"app": "postgres"}},
        "spec": {"selector": {"app": "postgres"}, "ports": [{"port": 5432}]}})
    create(crs, namespace, model_body("postgres", QWEN_05B, serving={"maxModelLen": 4096}))

    model = wait_condition(crs, namespace, "postgres", "Degraded", "True", "Conflict")
    assert "Service postgres" in condition(model, "Degraded")["message"]
    assert condition(model, "Ready")["status"] == "False"
    assert any(e.startswith("Conflict: Service postgres") for e in events_for(core, namespace, "postgres"))
    service = core.read_namespaced_service("postgres", namespace)
    assert service.spec.selector == {"app": "postgres"}, "the selector is not the model's"
    assert not service.metadata.owner_references, "no ownerReference added: deleting the model keeps it"
    assert service.metadata.managed_fields and all(f.manager != "slmfleet" for f in service.metadata.managed_fields)
    assert apps.list_namespaced_deployment(namespace).items == [], "nothing of the model's beside it"

    crs.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "postgres")
    wait_for(lambda: model_gone(crs, namespace, "postgres"), 30, what="the model deleted")
    assert core.read_namespaced_service("postgres", namespace).spec.selector == {"app": "postgres"}


def test_a_rollout_whose_route_is_named_like_another_owners_httproute_leaves_it_untouched(
        operator, crs, core, apps, namespace, still_reconciled):
    foreign = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "shop", "labels": {"team": "web"}},
               "spec": {"parentRefs": [{"name": "public"}],
                        "rules": [{"backendRefs": [{"name": "storefront", "port": 80}]}]}}
    crs.create_namespaced_custom_object("gateway.networking.k8s.io", "v1", namespace, "httproutes", foreign)
    create(crs, namespace, model_body("shop", QWEN_05B, serving={"maxModelLen": 4096}))
    body = rollout("shop", "shop", [{"setWeight": 50}])
    body["spec"]["traffic"] = {"httpRoute": {"parentRefs": [{"name": "public"}]}}
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, "modelrollouts", body)

    model = wait_condition(crs, namespace, "shop", "Degraded", "True", "Conflict")
    assert "HTTPRoute shop" in condition(model, "Degraded")["message"]
    route = crs.get_namespaced_custom_object("gateway.networking.k8s.io", "v1", namespace, "httproutes", "shop")
    assert route["spec"]["rules"][0]["backendRefs"] == [{"group": "", "kind": "Service", "name": "storefront",
                                                         "port": 80, "weight": 1}]
    assert not route["metadata"].get("ownerReferences")
    assert all(f["manager"] != "slmfleet" for f in route["metadata"]["managedFields"])


# ---------------------------------------------------------------------------------------------
# Deprecations: the platform's list fails safe (its ConfigMap is shared by every tenant's models).

DEPRECATIONS_NAMESPACE, DEPRECATIONS_NAME, DEPRECATIONS_KEY = "slmfleet-system", "slmfleet-deprecations", "deprecations.yaml"


def deprecations_events(core, reason: str) -> int:
    return sum(e.count or 1 for e in core.list_namespaced_event(
        DEPRECATIONS_NAMESPACE, field_selector=f"involvedObject.name={DEPRECATIONS_NAME}").items if e.reason == reason)


def put_deprecations(core, text: str) -> None:
    """The platform's list ConfigMap holding exactly `text` under its key, created if it is gone."""
    body = {"metadata": {"name": DEPRECATIONS_NAME}, "data": {DEPRECATIONS_KEY: text}}
    try:
        core.replace_namespaced_config_map(DEPRECATIONS_NAME, DEPRECATIONS_NAMESPACE, body)
    except ApiException as exc:
        if exc.status != 404:
            raise
        core.create_namespaced_config_map(DEPRECATIONS_NAMESPACE, body)


@contextmanager
def deprecating(operator, core, base_model: str) -> Iterator[None]:
    """The platform's list deprecates `base_model`; back to none at the end (the ConfigMap is
    emptied first, since deleting it keeps the list)."""
    if not any(n.metadata.name == DEPRECATIONS_NAMESPACE for n in core.list_namespace().items):
        core.create_namespace({"metadata": {"name": DEPRECATIONS_NAMESPACE}})
    listed = operator.log_text().count(f"deprecated base models: {base_model}")
    put_deprecations(core, f"deprecations:\n- baseModel: {base_model}\n  reason: licence withdrawn\n")
    wait_for(lambda: operator.log_text().count(f"deprecated base models: {base_model}") > listed, 30, 0.2,
             "the operator to read the list")
    try:
        yield
    finally:
        emptied = operator.log_text().count(NO_DEPRECATIONS)
        put_deprecations(core, "deprecations: []\n")
        wait_for(lambda: operator.log_text().count(NO_DEPRECATIONS) > emptied, 30, 0.2,
                 "the operator to read the emptied list")
        core.delete_namespaced_config_map(DEPRECATIONS_NAME, DEPRECATIONS_NAMESPACE)


def deprecated_model(crs, namespace: str, base_model: str) -> dict:
    create(crs, namespace, model_body("old", QWEN_05B, serving={"maxModelLen": 4096}, baseModel=base_model))
    return wait_condition(crs, namespace, "old", "Degraded", "True", "BaseModelDeprecated")


LOSSES = {
    "the ConfigMap deleted": lambda core: core.delete_namespaced_config_map(DEPRECATIONS_NAME, DEPRECATIONS_NAMESPACE),
    "its key renamed": lambda core: core.replace_namespaced_config_map(
        DEPRECATIONS_NAME, DEPRECATIONS_NAMESPACE,
        {"metadata": {"name": DEPRECATIONS_NAME}, "data": {"deprecation.yaml": "deprecations: []\n"}}),
}


@pytest.mark.parametrize("what", list(LOSSES))
def test_a_lost_deprecations_list_keeps_the_last_one_and_says_so(what, operator, crs, core, namespace,
                                                                 still_reconciled):
    base = f"org/withdrawn-{uuid.uuid4().hex[:6]}"
    with deprecating(operator, core, base):
        deprecated_model(crs, namespace, base)
        warned = deprecations_events(core, "DeprecationsMissing")
        LOSSES[what](core)
        wait_for(lambda: deprecations_events(core, "DeprecationsMissing") > warned, 30, 0.3,
                 "a DeprecationsMissing Warning on the ConfigMap")
        # Nothing was un-deprecated: a change to the model is still planned with the kept list.
        crs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "old",
                                           {"spec": {"serving": {"maxModelLen": 2048}}})
        wait_condition(crs, namespace, "old", "Degraded", "True", "BaseModelDeprecated")


INVALID_ENTRIES = {
    "a slash alone": "'/'",
    "a name with a trailing space": "'org/model '",
    "a reason too long to show": "org/model\n  reason: '" + "x" * 1000 + "'",
}


@pytest.mark.parametrize("what", list(INVALID_ENTRIES))
def test_a_deprecations_entry_that_could_never_match_is_refused_and_the_list_kept(
        what, operator, crs, core, namespace, still_reconciled):
    base = f"org/withdrawn-{uuid.uuid4().hex[:6]}"
    with deprecating(operator, core, base):
        deprecated_model(crs, namespace, base)
        warned = deprecations_events(core, "InvalidDeprecations")
        text = f"deprecations:\n- baseModel: {INVALID_ENTRIES[what]}\n"
        core.patch_namespaced_config_map(DEPRECATIONS_NAME, DEPRECATIONS_NAMESPACE, {"data": {DEPRECATIONS_KEY: text}})
        wait_for(lambda: deprecations_events(core, "InvalidDeprecations") > warned, 30, 0.3,
                 "an InvalidDeprecations Warning on the ConfigMap")
        crs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "old",
                                           {"spec": {"serving": {"maxModelLen": 2048}}})
        wait_condition(crs, namespace, "old", "Degraded", "True", "BaseModelDeprecated")
