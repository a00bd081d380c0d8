"""The operator's read of S3 weights before any pod: manifest first, then config and headers."""

from __future__ import annotations

import hashlib
import json
import struct

import boto3
import pytest
from moto import mock_aws

from slmfleet.weights.inspect import inspect_s3
from slmfleet.weights.manifest import FileEntry, Manifest

BUCKET = "models"


def safetensors(shape: list[int]) -> bytes:
    n = 2
    for d in shape:
        n *= d
    header = json.dumps({"w": {"dtype": "BF16", "shape": shape, "data_offsets": [0, n]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\x01" * n


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


class Recording:
    """A client wrapper that records which keys were read."""

    def __init__(self, client):
        self.client, self.keys = client, []

    def get_object(self, **kw):
        self.keys.append(kw["Key"])
        return self.client.get_object(**kw)

    def __getattr__(self, name):
        return getattr(self.client, name)


def put_model(client, files: dict[str, bytes], prefix: str = "q/") -> str:
    for path, data in files.items():
        client.put_object(Bucket=BUCKET, Key=prefix + path, Body=data)
    manifest = Manifest.of(FileEntry(p, len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items())
    client.put_object(Bucket=BUCKET, Key=prefix + "slmfleet-manifest.json", Body=manifest.canonical_bytes)
    return manifest.digest


def test_reads_config_and_exact_bytes_from_headers(s3):
    config = {"model_type": "qwen2", "num_hidden_layers": 2}
    digest = put_model(s3, {"config.json": json.dumps(config).encode(),
                            "model-00001.safetensors": safetensors([4, 8]), "model-00002.safetensors": safetensors([16])})
    facts = inspect_s3(s3, f"s3://{BUCKET}/q/", digest, allow_pickle=False)
    assert facts.problem is None, facts.message
    assert facts.config == config
    assert facts.weights_bytes == (4 * 8 + 16) * 2


def test_a_wrong_pin_stops_after_the_manifest(s3):
    put_model(s3, {"config.json": b"{}", "model.safetensors": safetensors([4])})
    client = Recording(s3)
    facts = inspect_s3(client, f"s3://{BUCKET}/q/", "sha256:" + "0" * 64, allow_pickle=False)
    assert facts.problem == "DigestMismatch" and not facts.transient
    assert client.keys == ["q/slmfleet-manifest.json"]


def test_pickle_files_are_refused_unless_allowed(s3):
    digest = put_model(s3, {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04data"})
    facts = inspect_s3(s3, f"s3://{BUCKET}/q/", digest, allow_pickle=False)
    assert facts.problem == "PickleRefused" and "pytorch_model.bin" in facts.message
    assert inspect_s3(s3, f"s3://{BUCKET}/q/", digest, allow_pickle=True).problem is None


def test_a_config_that_does_not_match_the_manifest_is_a_file_mismatch(s3):
    digest = put_model(s3, {"config.json": b"{}"})
    s3.put_object(Bucket=BUCKET, Key="q/config.json", Body=b'{"model_type": "evil"}')
    facts = inspect_s3(s3, f"s3://{BUCKET}/q/", digest, allow_pickle=False)
    assert facts.problem == "FileMismatch" and "config.json" in facts.message


def test_missing_manifest_and_unreachable_storage(s3):
    s3.put_object(Bucket=BUCKET, Key="bare/config.json", Body=b"{}")
    assert inspect_s3(s3, f"s3://{BUCKET}/bare/", "sha256:" + "1" * 64, allow_pickle=False).problem == "ManifestMissing"
    dead = boto3.client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                        config=__import__("botocore").config.Config(retries={"total_max_attempts": 1}, connect_timeout=1))
    facts = inspect_s3(dead, f"s3://{BUCKET}/q/", "sha256:" + "1" * 64, allow_pickle=False)
    assert facts.problem == "StorageUnreachable" and facts.transient


def test_without_a_secret_the_operator_reads_anonymously_never_with_its_own_identity():
    from botocore import UNSIGNED

    from slmfleet.weights.inspect import s3_client

    common = dict(endpoint_url="http://127.0.0.1:9", region="us-east-1", path_style=True, ca_bundle=None)
    anonymous = s3_client(**common, access_key_id=None, secret_access_key=None)
    assert anonymous.meta.config.signature_version is UNSIGNED
    keyed = s3_client(**common, access_key_id="AKIAEXAMPLE", secret_access_key="secret")
    assert keyed.meta.config.signature_version is not UNSIGNED
    assert keyed._request_signer._credentials.access_key == "AKIAEXAMPLE"


def test_a_storage_error_shows_no_remote_text():
    """An endpoint may echo the signed request (access key id included) in its error message:
    only a code that looks like one and the HTTP status reach status, Events and logs."""
    from botocore.exceptions import ClientError

    from slmfleet.weights.s3 import describe_error

    echoed = ClientError({"Error": {"Code": "AccessDenied", "Message": "Credential=MARKER-AKID/2026 denied"},
                          "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    assert describe_error(echoed) == "AccessDenied (HTTP 403)"
    odd = ClientError({"Error": {"Code": "<MARKER-AKID> please", "Message": "x"},
                       "ResponseMetadata": {"HTTPStatusCode": 400}}, "GetObject")
    assert describe_error(odd) == "error (HTTP 400)"
    assert len(describe_error(RuntimeError("x" * 10_000))) <= 300
