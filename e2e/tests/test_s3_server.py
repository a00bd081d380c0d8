"""The e2e S3 server (real MinIO, e2e/s3.py) and the fault proxy in front of it (e2e/fault_proxy.py).

No Kubernetes cluster here: only MinIO, built by e2e/build-binaries.sh if it is missing. Through
the proxy, the faults the weight loader must survive: 503 SlowDown / 500 InternalError answers
that botocore's standard retries absorb, and a connection cut mid-body that no client retry covers
(botocore retries until the response head, never inside the body), so the loader has to resume
with a ranged GET.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError, IncompleteReadError, ResponseStreamingError
from urllib3.exceptions import ProtocolError

from e2e.cluster import MARKER_ENV, REPO, Cluster, _alive, processes_with_env
from e2e.fault_proxy import FaultProxy
from e2e.s3 import REGION, S3Server

# A cold machine builds MinIO inside the first test's fixture (a few minutes on 2 cores).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

# Away from the cluster's 16443-16448 and 18390-18400 and from `python -m e2e.s3 up`'s 19000.
S3_PORT = 19004
PROXY_PORT = 19005
MARKER_TEST_PORT = 19006
CLI_PORT = 19007
MiB = 1024 * 1024
STREAM_ERRORS = (ResponseStreamingError, IncompleteReadError, ProtocolError, ConnectionError)


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Server:
    server = S3Server(tmp_path_factory.mktemp("s3"), port=S3_PORT).start()
    yield server
    server.down()


@pytest.fixture(scope="module")
def proxy(s3: S3Server) -> FaultProxy:
    p = FaultProxy(s3.port, port=PROXY_PORT)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def faults(proxy: FaultProxy) -> FaultProxy:
    """The proxy with no rules and fresh statistics."""
    proxy.clear()
    yield proxy
    proxy.clear()


@pytest.fixture
def bucket(s3: S3Server) -> str:
    return s3.make_bucket(f"t-{uuid.uuid4().hex[:12]}")


def retrying_client(s3: S3Server, proxy: FaultProxy, attempts: int = 4):
    """botocore's standard retry mode, `attempts` in all (max_attempts would count retries only)."""
    return s3.client(endpoint_url=proxy.url, retries={"mode": "standard", "total_max_attempts": attempts})


def payload(size: int) -> bytes:
    return os.urandom(size)


# ------------------------------------------------------------------------ the real server


def test_put_get_head_list(s3: S3Server, bucket: str):
    c = s3.client()
    data = payload(300_000)
    put = c.put_object(Bucket=bucket, Key="models/qwen/config.json", Body=data)
    assert put["ETag"].strip('"') == hashlib.md5(data).hexdigest()

    got = c.get_object(Bucket=bucket, Key="models/qwen/config.json")
    assert got["Body"].read() == data
    assert c.head_object(Bucket=bucket, Key="models/qwen/config.json")["ContentLength"] == len(data)
    listed = c.list_objects_v2(Bucket=bucket, Prefix="models/")
    assert [o["Key"] for o in listed["Contents"]] == ["models/qwen/config.json"]

    with pytest.raises(ClientError) as exc:
        c.get_object(Bucket=bucket, Key="models/missing")
    assert exc.value.response["Error"]["Code"] == "NoSuchKey"
    assert c.get_bucket_location(Bucket=bucket)["LocationConstraint"] in (None, "", REGION)


def test_ranged_get(s3: S3Server, bucket: str):
    c = s3.client()
    data = payload(1 * MiB)
    c.put_object(Bucket=bucket, Key="w.bin", Body=data)

    part = c.get_object(Bucket=bucket, Key="w.bin", Range="bytes=1000-1999")
    assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert part["ContentRange"] == f"bytes 1000-1999/{len(data)}"
    assert part["Body"].read() == data[1000:2000]
    tail = c.get_object(Bucket=bucket, Key="w.bin", Range=f"bytes={len(data) - 10}-")
    assert tail["Body"].read() == data[-10:]
    with pytest.raises(ClientError) as exc:
        c.get_object(Bucket=bucket, Key="w.bin", Range=f"bytes={len(data)}-")
    assert exc.value.response["Error"]["Code"] == "InvalidRange"


def test_multipart_upload(s3: S3Server, bucket: str):
    c = s3.client()
    parts_data = [payload(5 * MiB), payload(5 * MiB), payload(123_457)]
    upload = c.create_multipart_upload(Bucket=bucket, Key="model.safetensors")
    parts = []
    for number, chunk in enumerate(parts_data, start=1):
        etag = c.upload_part(Bucket=bucket, Key="model.safetensors", UploadId=upload["UploadId"],
                             PartNumber=number, Body=chunk)["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    done = c.complete_multipart_upload(Bucket=bucket, Key="model.safetensors", UploadId=upload["UploadId"],
                                       MultipartUpload={"Parts": parts})
    assert done["ETag"].strip('"').endswith("-3")

    whole = b"".join(parts_data)
    got = c.get_object(Bucket=bucket, Key="model.safetensors")
    assert got["ContentLength"] == len(whole)
    assert hashlib.sha256(got["Body"].read()).hexdigest() == hashlib.sha256(whole).hexdigest()
    # Ranged GET across the first part boundary.
    across = c.get_object(Bucket=bucket, Key="model.safetensors", Range=f"bytes={5 * MiB - 5}-{5 * MiB + 4}")
    assert across["Body"].read() == whole[5 * MiB - 5:5 * MiB + 5]


def test_credentials_are_private_and_never_logged(s3: S3Server):
    assert s3.credentials_file.stat().st_mode & 0o777 == 0o600
    assert s3.dir.stat().st_mode & 0o077 == 0
    assert len(s3.secret_key) >= 30 and s3.access_key.startswith("slm")
    assert s3.secret_key not in s3.log_path.read_text(errors="replace")
    # The process is tagged with the env marker (here: its own state dir).
    assert s3.pid() in processes_with_env(MARKER_ENV, str(s3.dir))
    # Signatures are checked: a wrong secret is refused.
    bad = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=REGION, aws_access_key_id=s3.access_key,
                       aws_secret_access_key="not-the-secret-" + uuid.uuid4().hex)
    with pytest.raises(ClientError) as exc:
        bad.list_buckets()
    assert exc.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


# ------------------------------------------------------------------------ through the fault proxy


def test_proxy_forwards_unchanged(s3: S3Server, faults: FaultProxy, bucket: str):
    c = s3.client(endpoint_url=faults.url)
    data = payload(2 * MiB)  # > 1 MiB: botocore sends `Expect: 100-continue`
    c.put_object(Bucket=bucket, Key="a/b c+d.bin", Body=data)  # the signature covers the encoded key
    assert c.get_object(Bucket=bucket, Key="a/b c+d.bin")["Body"].read() == data
    assert c.get_object(Bucket=bucket, Key="a/b c+d.bin", Range="bytes=0-9")["Body"].read() == data[:10]
    assert faults.stats["injected"] == 0
    assert [(r.method, r.path, r.outcome, r.status) for r in faults.requests] == [
        ("PUT", f"/{bucket}/a/b c+d.bin", "forwarded", 200),
        ("GET", f"/{bucket}/a/b c+d.bin", "forwarded", 200),
        ("GET", f"/{bucket}/a/b c+d.bin", "forwarded", 206),
    ]


def test_slowdown_is_retried_by_standard_retries(s3: S3Server, faults: FaultProxy, bucket: str):
    data = payload(700_000)
    s3.client().put_object(Bucket=bucket, Key="weights/model.safetensors", Body=data)
    rule = faults.add_rule("slowdown", method="GET", key="weights/model.safetensors", times=2)

    got = retrying_client(s3, faults).get_object(Bucket=bucket, Key="weights/model.safetensors")
    assert got["Body"].read() == data
    assert got["ResponseMetadata"]["RetryAttempts"] == 2
    assert rule.injected == 2
    assert faults.stats["injected"] == 2 and faults.stats["by_action"] == {"slowdown": 2}
    assert [(r.outcome, r.status) for r in faults.requests] == [("slowdown", 503), ("slowdown", 503),
                                                                 ("forwarded", 200)]

    # Without retries the 503 reaches the caller, with its S3 error code.
    faults.add_rule("slowdown", method="GET", key="weights/", times=1)
    with pytest.raises(ClientError) as exc:
        retrying_client(s3, faults, attempts=1).get_object(Bucket=bucket, Key="weights/model.safetensors")
    assert exc.value.response["Error"]["Code"] == "SlowDown"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503


def test_internal_errors_on_uploads_are_retried(s3: S3Server, faults: FaultProxy, bucket: str):
    c = retrying_client(s3, faults)
    # A small PUT (body sent at once: the proxy drains it before answering) ...
    small = faults.add_rule("internal_error", method="PUT", key="/small", times=1)
    c.put_object(Bucket=bucket, Key="small", Body=b"tiny")
    # ... and the parts of a managed multipart upload (bodies behind `Expect: 100-continue`).
    parts = faults.add_rule("internal_error", method="PUT", key="/big", query="partNumber=", times=2)
    data = payload(11 * MiB)
    c.upload_fileobj(io.BytesIO(data), bucket, "big",
                     Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB,
                                           max_concurrency=2))
    assert (small.injected, parts.injected) == (1, 2)
    assert faults.stats["by_action"] == {"internal_error": 3}
    plain = s3.client()
    assert plain.get_object(Bucket=bucket, Key="small")["Body"].read() == b"tiny"
    assert plain.get_object(Bucket=bucket, Key="big")["Body"].read() == data


def test_reset_mid_body_fails_the_get_and_a_ranged_get_resumes(s3: S3Server, faults: FaultProxy, bucket: str):
    data = payload(3 * MiB)
    s3.client().put_object(Bucket=bucket, Key="model.safetensors", Body=data)
    cut_at = 256 * 1024
    rule = faults.add_rule("reset", method="GET", key="model.safetensors", after_bytes=cut_at, times=1)

    # Retries do not help inside a body: the single GET fails after the first cut_at bytes.
    c = retrying_client(s3, faults)
    got = c.get_object(Bucket=bucket, Key="model.safetensors")
    received = bytearray()
    with pytest.raises(STREAM_ERRORS):
        for chunk in got["Body"].iter_chunks(64 * 1024):
            received += chunk
    assert bytes(received) == data[:cut_at]
    assert rule.injected == 1 and faults.stats["injected"] == 1
    assert faults.requests[-1].outcome == "reset" and faults.requests[-1].bytes_sent == cut_at

    # What the loader must do: resume from where it stopped.
    rest = c.get_object(Bucket=bucket, Key="model.safetensors", Range=f"bytes={len(received)}-")
    assert rest["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert bytes(received) + rest["Body"].read() == data
    assert [r.outcome for r in faults.requests] == ["reset", "forwarded"]
    assert faults.requests[-1].range == f"bytes={cut_at}-"


def test_hard_reset_fails_a_raw_get(s3: S3Server, faults: FaultProxy, bucket: str):
    data = payload(2 * MiB)
    s3.client().put_object(Bucket=bucket, Key="raw.bin", Body=data)
    url = s3.client(endpoint_url=faults.url).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "raw.bin"}, ExpiresIn=300)
    rule = faults.add_rule("reset", method="GET", key="raw.bin", after_bytes=100_000, hard=True)

    conn = http.client.HTTPConnection("127.0.0.1", faults.port, timeout=30)
    conn.request("GET", url.split(f":{faults.port}", 1)[1])
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(data)
    with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
        resp.read()
    conn.close()
    assert rule.injected == 1
    assert faults.stats["by_action"] == {"reset": 1}


def test_slow_body_arrives_intact(s3: S3Server, faults: FaultProxy, bucket: str):
    data = payload(512 * 1024)
    s3.client().put_object(Bucket=bucket, Key="slow.bin", Body=data)
    rule = faults.add_rule("slow", method="GET", key="slow.bin", delay=0.05, chunk_size=64 * 1024, times=1)
    t0 = time.monotonic()
    assert s3.client(endpoint_url=faults.url).get_object(Bucket=bucket, Key="slow.bin")["Body"].read() == data
    assert time.monotonic() - t0 >= 7 * 0.05  # 8 pieces, a delay between each two
    assert rule.injected == 1 and faults.requests[-1].outcome == "slow"
    assert faults.requests[-1].bytes_sent == len(data)


def test_rules_match_method_and_key(s3: S3Server, faults: FaultProxy, bucket: str):
    c = retrying_client(s3, faults, attempts=1)
    c.put_object(Bucket=bucket, Key="keep/a", Body=b"a")
    rule = faults.add_rule("internal_error", method="GET", key="/fail/", times=None)
    assert c.get_object(Bucket=bucket, Key="keep/a")["Body"].read() == b"a"   # other key
    c.head_object(Bucket=bucket, Key="keep/a")                                  # other method
    for _ in range(3):
        with pytest.raises(ClientError) as exc:
            c.get_object(Bucket=bucket, Key="fail/x")
        assert exc.value.response["Error"]["Code"] == "InternalError"
    assert rule.injected == 3 and rule.times is None
    faults.remove_rule(rule)
    with pytest.raises(ClientError) as exc:
        c.get_object(Bucket=bucket, Key="fail/x")
    assert exc.value.response["Error"]["Code"] == "NoSuchKey"  # from MinIO itself now


# ------------------------------------------------------------------------ process handling


def test_cluster_down_stops_a_server_tagged_with_its_marker(tmp_path: Path):
    """An S3 server started with a cluster's state dir as marker goes with `e2e.cluster down`."""
    cluster_dir = tmp_path / "cluster"
    cluster_dir.mkdir()
    server = S3Server(cluster_dir / "s3", port=MARKER_TEST_PORT, marker_dir=cluster_dir).start()
    pid = server.pid()
    assert pid and pid in Cluster(cluster_dir).our_processes()
    Cluster(cluster_dir).down()  # no control plane here: only leftovers tagged with the marker
    assert not _alive(pid)
    assert not cluster_dir.exists()
    server.stop()  # nothing left to stop; reaps the child this test started


def test_cli_up_env_status_down(tmp_path: Path):
    state = tmp_path / "s3cli"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "e2e.s3", *args, f"--state-dir={state}", f"--port={CLI_PORT}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)

    up = cli("up")
    assert up.returncode == 0, up.stderr
    server = S3Server(state, CLI_PORT)
    try:
        assert f"export AWS_ENDPOINT_URL_S3=http://127.0.0.1:{CLI_PORT}" in up.stdout
        assert server.secret_key not in up.stdout + up.stderr
        assert cli("up").returncode == 0  # idempotent: reuses the running server
        assert cli("status").returncode == 0
        # The printed environment is enough for boto3 (credentials from the 0600 file).
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(server.client_env())
        code = "import boto3; print(len(boto3.client('s3').list_buckets()['Buckets']))"
        probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0 and probe.stdout.strip() == "0", probe.stderr
        pid = server.pid()
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr
    assert not _alive(pid) and not state.exists()
    assert cli("status").returncode == 1
