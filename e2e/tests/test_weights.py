"""Pinned weights end to end: a real S3 server (MinIO), a fault proxy, the loader in pods on
process nodes, and the operator reading manifests and safetensors headers before any pod exists."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from e2e.fault_proxy import FaultProxy
from e2e.tests.conftest import BUCKET, S3_CREDENTIALS_META, delete_models
from e2e.wait import wait_for

GROUP, VERSION, PLURAL = "slmfleet.io", "v1alpha1", "smallmodels"
SLMFLEET = str(Path(sys.executable).parent / "slmfleet")

QWEN_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "vocab_size": 151936, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
STANDIN = {"responses": [{"prompt": "What is the capital of France?", "completion": "Paris"}],
           "default_completion": "stand-in", "latency_ms": {"mean": 5, "p95": 10}, "error_rate": 0.0,
           "startup_seconds": 0}


def safetensors_file(tensors: dict[str, tuple[str, list[int]]], seed: int = 0) -> bytes:
    """A real safetensors file: 8-byte little-endian header length, JSON header, then the data."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4}
    header, offset = {}, 0
    for name, (dtype, shape) in sorted(tensors.items()):
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = hashlib.sha256(str(seed).encode()).digest() * (offset // 32 + 1)
    return struct.pack("<Q", len(raw)) + raw + data[:offset]


# Two tensors, 8 MiB + a bit: big enough for the fault proxy to cut a download in the middle.
TENSORS = {"model.embed_tokens.weight": ("BF16", [1024, 4096]), "model.norm.weight": ("BF16", [896])}
TENSOR_BYTES = 1024 * 4096 * 2 + 896 * 2


@pytest.fixture
def proxy(s3):
    fp = FaultProxy(s3.port)
    fp.start()
    yield fp
    fp.stop()


def s3_env(s3, endpoint: str | None = None) -> dict[str, str]:
    """The loader's and pin's environment, as a pod would get it (credentials from a Secret)."""
    return {**os.environ, "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_ENDPOINT_URL": endpoint or s3.endpoint_url, "AWS_DEFAULT_REGION": s3.region}


def upload(s3, files: dict[str, bytes]) -> tuple[str, str]:
    """Upload a model directory under a fresh prefix, pin it with `slmfleet pin --write`; (uri, digest)."""
    prefix = f"m-{uuid.uuid4().hex[:8]}/"
    client = s3.client()
    for path, data in files.items():
        client.put_object(Bucket=BUCKET, Key=prefix + path, Body=data)
    uri = f"s3://{BUCKET}/{prefix}"
    out = subprocess.run([SLMFLEET, "pin", uri, "--write", "--no-progress"], env=s3_env(s3),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    digest = out.stdout.strip().splitlines()[-1]
    assert digest.startswith("sha256:")
    return uri, digest


def model_files(weights: bytes | None = None, pickle: bool = False) -> dict[str, bytes]:
    files = {"config.json": json.dumps(QWEN_CONFIG).encode(), "standin.json": json.dumps(STANDIN).encode()}
    if pickle:
        files["pytorch_model.bin"] = b"\x80\x04" + os.urandom(4096)
    else:
        files["model.safetensors"] = weights or safetensors_file(TENSORS)
    return files


def credentials_secret(core, namespace, s3) -> str:
    core.create_namespaced_secret(namespace, {"metadata": S3_CREDENTIALS_META, "stringData": {
        "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}})
    return "s3-creds"


def s3_model(name: str, uri: str, digest: str, endpoint: str, *, allow_pickle: bool = False, replicas: int = 1) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SmallModel", "metadata": {"name": name},
        "spec": {
            "source": {"uri": uri, "digest": digest, "allowPickle": allow_pickle,
                       "s3": {"endpoint": endpoint, "credentialsSecret": {"name": "s3-creds"}}},
            # No architecture: the operator reads config.json and the safetensors headers.
            "serving": {"maxModelLen": 4096, "concurrency": 4, "replicas": replicas,
                        "servedModelName": "qwen-pinned"},
            "resources": {"nodeSelector": {"slmfleet.io/node-agent": "process"}},
        },
    }


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def get(crs, namespace, name) -> dict:
    return crs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_condition(crs, namespace, name, type_, status, reason=None, timeout=90) -> dict:
    def check():
        obj = get(crs, namespace, name)
        cond = condition(obj, type_)
        fresh = cond.get("observedGeneration") == obj["metadata"]["generation"]
        return obj if fresh and cond.get("status") == status and reason in (None, cond.get("reason")) else None

    return wait_for(check, timeout, 0.3, f"{name}: {type_}={status} {reason or ''}")


def chat(ip: str) -> str:
    req = urllib.request.Request(
        f"http://{ip}:8000/v1/chat/completions",
        data=json.dumps({"model": "qwen-pinned",
                         "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def pods_of(core, namespace, name):
    return [p for p in core.list_namespaced_pod(namespace, label_selector=f"slmfleet.io/model={name}").items
            if p.metadata.deletion_timestamp is None]


@pytest.fixture
def cleanup_models(crs, core, namespace, process_nodes_free):
    """Process nodes are scarce (two L4s): delete this test's models and wait for their pods to go."""
    yield
    delete_models(crs.api_client, namespace)
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, 90, what="pods gone")


def test_s3_weights_are_read_loaded_verified_and_served_and_a_flipped_byte_fails_new_pods_only(
        operator, s3, crs, core, namespace, cleanup_models):
    uri, digest = upload(s3, model_files())
    credentials_secret(core, namespace, s3)
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, s3_model("pinned", uri, digest, s3.endpoint_url))
    obj = wait_condition(crs, namespace, "pinned", "Ready", "True", "Serving", timeout=120)
    assert condition(obj, "WeightsVerified")["status"] == "True"
    # Sized from the weights themselves: exact bytes from the safetensors header.
    assert obj["status"]["placement"]["memory"]["weightsBytes"] == TENSOR_BYTES
    [pod] = pods_of(core, namespace, "pinned")
    assert chat(pod.status.pod_ip) == "Paris"
    secret = s3.secret_key
    assert secret not in json.dumps(obj) and secret not in operator.log_text()

    # One flipped byte in the S3 object; a new replica's loader must refuse it.
    client = s3.client()
    key = uri.removeprefix(f"s3://{BUCKET}/") + "model.safetensors"
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    crs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "pinned", {"spec": {"serving": {"replicas": 2}}})
    obj = wait_condition(crs, namespace, "pinned", "WeightsVerified", "False", "FileMismatch", timeout=120)
    message = condition(obj, "WeightsVerified")["message"]
    assert "model.safetensors" in message, message
    # The pod that was Ready keeps serving.
    assert chat(pod.status.pod_ip) == "Paris"
    assert core.read_namespaced_pod(pod.metadata.name, namespace).status.container_statuses[0].ready
    samples = operator.metrics()
    assert samples.get('slmfleet_weight_verification_failures_total{reason="FileMismatch"}', 0) >= 1


def test_a_pin_that_does_not_match_is_refused_before_any_weight_byte_is_read(
        operator, s3, proxy, crs, core, namespace, cleanup_models, tmp_path):
    uri, digest = upload(s3, model_files())
    wrong = "sha256:" + hashlib.sha256(b"another model").hexdigest()
    credentials_secret(core, namespace, s3)
    proxy.clear()
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, s3_model("wrong-pin", uri, wrong, proxy.url))
    obj = wait_condition(crs, namespace, "wrong-pin", "Degraded", "True", "DigestMismatch")
    assert condition(obj, "WeightsVerified")["reason"] == "DigestMismatch"
    assert digest in condition(obj, "Degraded")["message"]
    assert not pods_of(core, namespace, "wrong-pin")
    read = {r.path.rsplit("/", 1)[-1] for r in proxy.requests if r.method == "GET"}
    assert read == {"slmfleet-manifest.json"}, read

    # The loader refuses the same way, on its own, before downloading anything.
    proxy.clear()
    out = subprocess.run([SLMFLEET, "load", "--source", uri, "--digest", wrong, "--dest", str(tmp_path / "m"),
                          "--no-progress"], env=s3_env(s3, proxy.url), capture_output=True, text=True, timeout=120)
    assert out.returncode == 10, out.stderr
    assert {r.path.rsplit("/", 1)[-1] for r in proxy.requests if r.method == "GET"} <= {"slmfleet-manifest.json"}


def test_a_pickle_only_model_is_refused_unless_explicitly_allowed(operator, s3, crs, core, namespace, cleanup_models):
    uri, digest = upload(s3, model_files(pickle=True))
    credentials_secret(core, namespace, s3)
    body = s3_model("pickled", uri, digest, s3.endpoint_url)
    body["spec"]["architecture"] = {  # no safetensors headers to read the size from
        "modelType": "qwen2", "numHiddenLayers": 24, "hiddenSize": 896, "numAttentionHeads": 14,
        "numKeyValueHeads": 2, "vocabSize": 151936, "intermediateSize": 4864, "tieWordEmbeddings": True,
        "maxPositionEmbeddings": 32768}
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    obj = wait_condition(crs, namespace, "pickled", "Degraded", "True", "PickleRefused")
    assert "pytorch_model.bin" in condition(obj, "Degraded")["message"]
    assert "allowPickle" in condition(obj, "Degraded")["message"]
    assert not pods_of(core, namespace, "pickled")
    crs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "pickled", {"spec": {"source": {"allowPickle": True}}})
    obj = wait_condition(crs, namespace, "pickled", "Ready", "True", timeout=120)
    assert condition(obj, "WeightsVerified")["status"] == "True"


def test_injected_faults_are_retried_and_the_load_ends_with_correct_hashes(s3, proxy, tmp_path):
    weights = safetensors_file(TENSORS, seed=7)
    uri, digest = upload(s3, model_files(weights))
    proxy.add_rule("slowdown", method="GET", key="model.safetensors", times=2)
    proxy.add_rule("internal_error", method="GET", key="config.json", times=1)
    proxy.add_rule("reset", method="GET", key="model.safetensors", after_bytes=1 << 20, times=2)
    dest = tmp_path / "model"
    out = subprocess.run([SLMFLEET, "load", "--source", uri, "--digest", digest, "--dest", str(dest), "--no-progress"],
                         env=s3_env(s3, proxy.url), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256((dest / "model.safetensors").read_bytes()).digest() == hashlib.sha256(weights).digest()
    assert proxy.stats["injected"] >= 5, proxy.stats
    # Ranged GETs resumed where the resets cut the body.
    assert any(r.range for r in proxy.requests if "model.safetensors" in r.path)


def test_a_load_that_cannot_succeed_ends_with_a_clear_error(s3, proxy, tmp_path):
    uri, digest = upload(s3, model_files())
    proxy.add_rule("slowdown", method="GET", key="", times=None)
    out = subprocess.run([SLMFLEET, "load", "--source", uri, "--digest", digest, "--dest", str(tmp_path / "m"),
                          "--no-progress", "--termination-message-path", str(tmp_path / "term")],
                         env=s3_env(s3, proxy.url), capture_output=True, text=True, timeout=300)
    assert out.returncode == 13, out.stderr
    assert "SlowDown" in out.stderr or "503" in out.stderr
    assert (tmp_path / "term").read_text().strip()
