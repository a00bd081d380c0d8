"""The safetensors header reader and the S3 helpers the operator uses to read it with ranged GETs."""

import json
import os
import struct

import boto3
import pytest
from moto import mock_aws

from slmfleet.weights.s3 import (
    S3Location,
    S3Settings,
    S3UriError,
    client_from_env,
    content_range_total,
    is_retryable,
    read_range,
)
from slmfleet.weights.safetensors import (
    MAX_HEADER_BYTES,
    SafetensorsError,
    dtype_bytes,
    header_length,
    metadata,
    parameter_count,
    parse_header,
    read_header,
    tensor_bytes,
)


def safetensors_file(tensors, meta=None, pad=0):
    """A minimal safetensors file: (bytes, header bytes). tensors: {name: (dtype, shape, nbytes)}."""
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + os.urandom(offset), raw


TENSORS = {
    "model.embed_tokens.weight": ("BF16", [1000, 64], 1000 * 64 * 2),
    "model.layers.0.mlp.up_proj.weight": ("F8_E4M3", [128, 64], 128 * 64),
    "model.norm.weight": ("F32", [64], 256),
    "lm_head.bias": ("F64", [3], 24),
    "scale": ("F16", [], 2),
    "mask": ("BOOL", [7], 7),
    "ids": ("I64", [2, 2], 32),
    "packed": ("F4", [3], 2),
}


def test_header_length():
    assert header_length(struct.pack("<Q", 1234)) == 1234
    assert header_length((MAX_HEADER_BYTES).to_bytes(8, "little")) == MAX_HEADER_BYTES
    for bad in (b"", b"\x01" * 7, b"\x01" * 9):
        with pytest.raises(SafetensorsError, match="8 bytes"):
            header_length(bad)
    for n in (0, 1, MAX_HEADER_BYTES + 1, 2**64 - 1):
        with pytest.raises(SafetensorsError):
            header_length(n.to_bytes(8, "little"))


def test_parse_header_and_totals():
    data, raw = safetensors_file(TENSORS, meta={"format": "pt"}, pad=5)
    n = header_length(data[:8])
    assert data[8:8 + n] == raw
    header = parse_header(data[8:8 + n])
    assert set(header) == set(TENSORS)  # __metadata__ skipped
    assert header["model.norm.weight"] == {"dtype": "F32", "shape": [64], "data_offsets": [
        TENSORS["model.embed_tokens.weight"][2] + TENSORS["model.layers.0.mlp.up_proj.weight"][2],
        TENSORS["model.embed_tokens.weight"][2] + TENSORS["model.layers.0.mlp.up_proj.weight"][2] + 256]}
    assert tensor_bytes(header) == sum(nbytes for _, _, nbytes in TENSORS.values()) == len(data) - 8 - n
    assert parameter_count(header) == 1000 * 64 + 128 * 64 + 64 + 3 + 1 + 7 + 4 + 3
    assert dtype_bytes(header)["BF16"] == 128_000 and dtype_bytes(header)["F8_E4M3"] == 8192
    assert metadata(raw) == {"format": "pt"}


@pytest.mark.parametrize("header, match", [
    (b"[]", "not a JSON object"),
    (b"\xff", "not JSON"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', "duplicate"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 9]}}', "needs 8 bytes"),
    (b'{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "shape"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', "data_offsets"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}', "data_offsets"),
    (b'{"a": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}}', "dtype"),
    (b'{"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}', "unknown dtype"),
    (b'{"a": [1, 2]}', "not an object"),
])
def test_bad_headers_are_refused(header, match):
    with pytest.raises(SafetensorsError, match=match):
        parse_header(header)


def test_read_header_from_a_local_file(tmp_path):
    data, _ = safetensors_file(TENSORS)
    (tmp_path / "model.safetensors").write_bytes(data)
    reads = []

    def read(start, length):
        reads.append((start, length))
        with open(tmp_path / "model.safetensors", "rb") as f:
            f.seek(start)
            return f.read(length)

    assert tensor_bytes(read_header(read)) == sum(nbytes for _, _, nbytes in TENSORS.values())
    assert reads[0] == (0, 8) and len(reads) == 2
    with pytest.raises(SafetensorsError, match="ends inside"):
        read_header(lambda start, length: data[:20][start:start + length])


# --- S3 helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri, bucket, prefix", [
    ("s3://weights", "weights", ""),
    ("s3://weights/", "weights", ""),
    ("s3://weights/qwen/0.5b", "weights", "qwen/0.5b/"),
    ("s3://weights/qwen/0.5b/", "weights", "qwen/0.5b/"),
    ("s3://my.bucket-1/a", "my.bucket-1", "a/"),
])
def test_s3_location_parse(uri, bucket, prefix):
    loc = S3Location.parse(uri)
    assert (loc.bucket, loc.prefix) == (bucket, prefix)
    assert loc.key("config.json") == prefix + "config.json" and loc.relative(prefix + "x/y") == "x/y"
    assert str(loc) == f"s3://{bucket}/{prefix}"


@pytest.mark.parametrize("uri", ["http://x/y", "s3://", "s3://UPPER/x", "s3://b_c/x", "s3://bucket/a//b",
                                 "s3://bucket/../x", "s3://bucket/a/./b", "s3://bucket//"])
def test_s3_location_rejects(uri):
    with pytest.raises(S3UriError):
        S3Location.parse(uri)


def test_settings_from_env_and_overrides():
    env = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_CA_BUNDLE": "/etc/ca.pem",
           "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "very-secret"}
    s = S3Settings.from_env(environ=env)
    assert (s.endpoint_url, s.effective_region, s.effective_addressing_style, s.ca_bundle) == \
        ("http://minio:9000", "us-east-1", "path", "/etc/ca.pem")
    assert "very-secret" not in s.describe() and "AKIA" not in s.describe()
    assert S3Settings.from_env(environ={}).effective_addressing_style == "auto"
    assert S3Settings.from_env(environ={}).effective_region is None
    assert S3Settings.from_env(environ={"AWS_S3_ADDRESSING_STYLE": "path"}).effective_addressing_style == "path"
    assert S3Settings.from_env(environ={**env, "AWS_ENDPOINT_URL_S3": "http://s3only:9000"}).endpoint_url == \
        "http://s3only:9000"
    s = S3Settings.from_env({"endpoint_url": "https://other", "region": "eu-west-1", "path_style": False,
                             "ca_bundle": None}, environ=env)
    assert (s.endpoint_url, s.effective_region, s.effective_addressing_style, s.ca_bundle) == \
        ("https://other", "eu-west-1", "virtual", "/etc/ca.pem")
    assert S3Settings.from_env({"path_style": True}, environ={}).effective_addressing_style == "path"
    with pytest.raises(ValueError):
        S3Settings.from_env({"secret": "x"}, environ={})
    with pytest.raises(ValueError):
        S3Settings.from_env(environ={"AWS_S3_ADDRESSING_STYLE": "sideways"})


def test_client_from_env_honours_the_settings(monkeypatch):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    client = client_from_env()
    assert client.meta.endpoint_url == "http://127.0.0.1:9" and client.meta.region_name == "us-east-1"
    assert client.meta.config.s3["addressing_style"] == "path"
    client = client_from_env({"endpoint_url": "http://127.0.0.2:9", "region": "eu-central-1", "max_attempts": 1})
    assert client.meta.endpoint_url == "http://127.0.0.2:9" and client.meta.region_name == "eu-central-1"
    assert client.meta.config.retries["total_max_attempts"] == 1


def test_read_range_with_moto(monkeypatch):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    data, _ = safetensors_file(TENSORS, meta={"format": "pt"})
    with mock_aws():
        setup = boto3.client("s3", region_name="us-east-1")
        setup.create_bucket(Bucket="weights")
        setup.put_object(Bucket="weights", Key="m/model.safetensors", Body=data)
        client = client_from_env()
        assert read_range(client, "weights", "m/model.safetensors", 0, 8) == data[:8]
        assert read_range(client, "weights", "m/model.safetensors", 100, 50) == data[100:150]
        assert read_range(client, "weights", "m/model.safetensors", len(data) - 4, 100) == data[-4:]
        assert read_range(client, "weights", "m/model.safetensors", 5, 0) == b""
        header = read_header(lambda start, length: read_range(client, "weights", "m/model.safetensors", start, length))
        assert set(header) == set(TENSORS)


def test_error_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, SSLError

    def ce(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_retryable(ce("SlowDown", 503)) and is_retryable(ce("Whatever", 502)) and is_retryable(ce("X", 429))
    assert is_retryable(EndpointConnectionError(endpoint_url="x")) and is_retryable(ConnectionResetError())
    assert not is_retryable(ce("AccessDenied", 403)) and not is_retryable(ce("NoSuchKey", 404))
    assert not is_retryable(NoCredentialsError()) and not is_retryable(SSLError(endpoint_url="x", error="bad cert"))
    assert content_range_total("bytes 0-7/1234") == 1234 and content_range_total(None) is None
