"""The verified loader against a local directory and moto's S3: what it serves, what it refuses."""

import hashlib
import json
import os
import socket
import time

import boto3
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from moto import mock_aws

from slmfleet.weights.errors import (
    EXIT_DIGEST_MISMATCH,
    EXIT_FILE_MISMATCH,
    EXIT_REFUSED_FORMAT,
    EXIT_SOURCE_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    WeightsError,
)
from slmfleet.weights.loader import LoadOptions, load
from slmfleet.weights.manifest import MANIFEST_NAME, STAGING_DIR, VERIFIED_MARKER, manifest_of_directory
from slmfleet.weights.pin import pin
from slmfleet.weights.s3 import S3Location, client_from_env
from slmfleet.weights.transfer import LocalSource, RetryPolicy, S3Source

PART = 64 * 1024  # the smallest part size, so the test files span several ranges
FAST = RetryPolicy(attempts=4, initial_wait=0.001, max_wait=0.01)
BUCKET = "weights"
PREFIX = "models/tiny/"


def options(**kw):
    kw.setdefault("part_size", PART)
    kw.setdefault("concurrency", 4)
    kw.setdefault("retry", FAST)
    kw.setdefault("progress", False)
    return LoadOptions(**kw)


def make_model(root, *, big=5 * PART + 123):
    (root / "sub").mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "qwen2", "num_hidden_layers": 2}',
        "model.safetensors": os.urandom(big),
        "tokenizer.json": b'{"version": "1.0"}',
        "sub/tokenizer_copy.json": b'{"version": "1.0"}',  # same content as tokenizer.json
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return files


def quiet(_message):
    pass


class Logs(list):
    def __call__(self, message):
        self.append(message)


def dest_files(dest):
    out = {}
    for dirpath, _dirs, names in os.walk(dest):
        for name in names:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, dest).replace(os.sep, "/")] = open(full, "rb").read()
    out.pop(VERIFIED_MARKER, None)
    return out


@pytest.fixture
def model(tmp_path):
    root = tmp_path / "model"
    files = make_model(root)
    digest = pin(str(root), write=True, log=quiet).digest
    return root, files, digest


# --- local sources ------------------------------------------------------------------------------


class SpyLocal(LocalSource):
    def __init__(self, root):
        super().__init__(root)
        self.reads = []

    def get_range(self, path, start, length):
        self.reads.append((path, start, length))
        return super().get_range(path, start, length)


def test_local_load_serves_exactly_the_manifest(model, tmp_path):
    root, files, digest = model
    (root / "extra.bin").write_bytes(b"not in the manifest")  # added after pinning
    dest = tmp_path / "dest"
    source = SpyLocal(root)
    logs = Logs()
    result = load(source, digest, dest, options(), log=logs)
    assert not result.cache_hit and result.files == len(files) and result.digest == digest
    assert dest_files(dest) == files
    assert not any(p == "extra.bin" for p, _, _ in source.reads)
    assert not (dest / STAGING_DIR).exists()
    marker = json.loads((dest / VERIFIED_MARKER).read_text())
    assert marker["digest"] == digest and set(marker["files"]) == set(files)
    assert manifest_of_directory(dest).digest == digest  # the marker is not part of the model
    assert all(not os.access(dest / rel, os.W_OK) or os.geteuid() == 0 for rel in files)
    assert all(oct((dest / rel).stat().st_mode & 0o777) == "0o444" for rel in files)
    # Identical content is read once; one log line per file.
    assert sum(1 for p, _, _ in source.reads if p in ("tokenizer.json", "sub/tokenizer_copy.json")) == 1
    for rel in files:
        assert any(rel in line for line in logs), rel


def test_file_uri_and_a_local_source_without_manifest(model, tmp_path):
    root, files, digest = model
    (root / MANIFEST_NAME).unlink()
    dest = tmp_path / "dest"
    logs = Logs()
    load(f"file://{root}", digest, dest, options(), log=logs)
    assert dest_files(dest) == files
    assert any("no slmfleet-manifest.json" in line for line in logs)
    with pytest.raises(WeightsError) as err:
        load(str(root), "sha256:" + "0" * 64, tmp_path / "dest2", options(), log=quiet)
    assert err.value.exit_code == EXIT_DIGEST_MISMATCH
    assert dest_files(tmp_path / "dest2") == {}


def test_wrong_pin_is_refused_before_any_file_is_read(model, tmp_path):
    root, _files, digest = model
    source = SpyLocal(root)
    wrong = "sha256:" + "1" * 64
    with pytest.raises(WeightsError) as err:
        load(source, wrong, tmp_path / "dest", options(), log=quiet)
    assert err.value.exit_code == EXIT_DIGEST_MISMATCH
    assert digest in err.value.message and wrong in err.value.message
    assert source.reads == []
    assert dest_files(tmp_path / "dest") == {}


def test_a_tampered_manifest_is_a_digest_mismatch(model, tmp_path):
    root, _files, digest = model
    doc = json.loads((root / MANIFEST_NAME).read_text())
    doc["files"][0]["sha256"] = "0" * 64
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(WeightsError) as err:
        load(SpyLocal(root), digest, tmp_path / "dest", options(), log=quiet)
    assert err.value.exit_code == EXIT_DIGEST_MISMATCH
    (root / MANIFEST_NAME).write_text('{"files":[{"path":"../../etc/passwd","size":1,"sha256":"' + "0" * 64
                                      + '"}],"version":1}')
    with pytest.raises(WeightsError) as err:
        load(SpyLocal(root), digest, tmp_path / "dest", options(), log=quiet)
    assert err.value.exit_code == EXIT_DIGEST_MISMATCH and "not a valid manifest" in err.value.message


def test_flipped_byte_fails_closed_naming_the_file_and_hashes(model, tmp_path):
    root, files, digest = model
    data = bytearray(files["model.safetensors"])
    data[3 * PART + 7] ^= 0x01
    os.chmod(root / "model.safetensors", 0o644)
    (root / "model.safetensors").write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises(WeightsError) as err:
        load(str(root), digest, dest, options(), log=quiet)
    e = err.value
    assert e.exit_code == EXIT_FILE_MISMATCH
    expected = hashlib.sha256(files["model.safetensors"]).hexdigest()
    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert "model.safetensors" in e.message and expected in e.message and actual in e.message
    assert (e.path, e.expected, e.actual) == ("model.safetensors", f"sha256:{expected}", f"sha256:{actual}")
    assert not (dest / "model.safetensors").exists() and not (dest / VERIFIED_MARKER).exists()


def test_missing_and_truncated_files_are_file_mismatches(model, tmp_path):
    root, files, digest = model
    (root / "config.json").unlink()
    with pytest.raises(WeightsError) as err:
        load(str(root), digest, tmp_path / "d1", options(), log=quiet)
    assert err.value.exit_code == EXIT_FILE_MISMATCH and "config.json" in err.value.message
    assert "no such file" in err.value.message
    (root / "config.json").write_bytes(files["config.json"])
    with open(root / "model.safetensors", "r+b") as f:
        f.truncate(PART)
    with pytest.raises(WeightsError) as err:
        load(str(root), digest, tmp_path / "d2", options(), log=quiet)
    assert err.value.exit_code == EXIT_FILE_MISMATCH and "model.safetensors" in err.value.message


def test_pickle_is_refused_unless_allowed(tmp_path):
    root = tmp_path / "model"
    make_model(root)
    (root / "pytorch_model.BIN").write_bytes(b"\x80\x04pickle")
    digest = pin(str(root), write=True, log=quiet).digest
    source = SpyLocal(root)
    with pytest.raises(WeightsError) as err:
        load(source, digest, tmp_path / "d1", options(), log=quiet)
    assert err.value.exit_code == EXIT_REFUSED_FORMAT and "pytorch_model.BIN" in err.value.message
    assert source.reads == []
    load(str(root), digest, tmp_path / "d2", options(allow_pickle=True), log=quiet)
    assert (tmp_path / "d2" / "pytorch_model.BIN").read_bytes() == b"\x80\x04pickle"
    # A cached copy with pickle files is refused all the same without the flag.
    with pytest.raises(WeightsError) as err:
        load(str(root), digest, tmp_path / "d2", options(), log=quiet)
    assert err.value.exit_code == EXIT_REFUSED_FORMAT


def test_cache_hit_does_not_touch_the_source(model, tmp_path):
    root, files, digest = model
    dest = tmp_path / "dest"
    load(str(root), digest, dest, options(), log=quiet)
    (dest / "stray.txt").write_text("left by someone")
    source = SpyLocal(tmp_path / "gone")  # the storage is not even there
    t0 = time.monotonic()
    result = load(source, digest, dest, options(), log=quiet)
    assert result.cache_hit and time.monotonic() - t0 < 1.0
    assert source.reads == [] and result.removed == ("stray.txt",)
    assert dest_files(dest) == files


def test_cache_checks_sizes_and_mtimes_and_reverify_hashes(model, tmp_path):
    root, files, digest = model
    dest = tmp_path / "dest"
    load(str(root), digest, dest, options(), log=quiet)
    target = dest / "model.safetensors"
    st = target.stat()
    os.chmod(target, 0o644)
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only a hash can tell
    assert load(str(root), digest, dest, options(), log=quiet).cache_hit
    source = SpyLocal(root)
    result = load(source, digest, dest, options(reverify=True), log=quiet)
    assert not result.cache_hit and {p for p, _, _ in source.reads} == {"model.safetensors"}
    assert dest_files(dest) == files
    # A touched file is hashed again and kept when it still matches: nothing is fetched.
    os.utime(dest / "config.json", ns=(1, 1))
    source = SpyLocal(root)
    result = load(source, digest, dest, options(), log=quiet)
    assert not result.cache_hit and source.reads == [] and result.reused_files == len(files)
    assert load(str(root), digest, dest, options(), log=quiet).cache_hit


def test_a_new_digest_fetches_only_what_changed(model, tmp_path):
    root, files, digest = model
    dest = tmp_path / "dest"
    load(str(root), digest, dest, options(), log=quiet)
    (root / "config.json").write_bytes(b'{"model_type": "qwen3"}')
    (root / "tokenizer.json").unlink()
    (root / "sub" / "tokenizer_copy.json").unlink()
    new = pin(str(root), write=True, log=quiet).digest
    source = SpyLocal(root)
    result = load(source, new, dest, options(), log=quiet)
    assert {p for p, _, _ in source.reads} == {"config.json"}
    assert set(result.removed) == {"tokenizer.json", "sub/tokenizer_copy.json"}
    assert not (dest / "sub").exists()
    assert manifest_of_directory(dest).digest == new


def test_resume_continues_a_partial_file(model, tmp_path):
    root, files, digest = model
    dest = tmp_path / "dest"
    staging = dest / STAGING_DIR
    staging.mkdir(parents=True)
    data = files["model.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    (staging / f"{sha}.part").write_bytes(data[: 2 * PART + 10])
    source = SpyLocal(root)
    logs = Logs()
    result = load(source, digest, dest, options(), log=logs)
    reads = [(s, n) for p, s, n in source.reads if p == "model.safetensors"]
    assert min(s for s, _ in reads) == 2 * PART + 10 and sum(n for _, n in reads) == len(data) - (2 * PART + 10)
    assert result.downloaded_bytes < sum(len(v) for v in files.values())
    assert dest_files(dest) == files
    assert any("resuming model.safetensors" in line for line in logs)


def test_a_corrupt_partial_file_is_fetched_again_from_the_start(model, tmp_path):
    root, files, digest = model
    dest = tmp_path / "dest"
    (dest / STAGING_DIR).mkdir(parents=True)
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    (dest / STAGING_DIR / f"{sha}.part").write_bytes(b"garbage" * 100)
    logs = Logs()
    load(str(root), digest, dest, options(), log=logs)
    assert dest_files(dest) == files
    assert any("fetching it again from the start" in line for line in logs)


def test_dest_must_be_empty_or_ours(model, tmp_path):
    root, files, digest = model
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "precious.txt").write_text("mine")
    (dest / "lost+found").mkdir()
    with pytest.raises(WeightsError) as err:
        load(str(root), digest, dest, options(), log=quiet)
    assert err.value.exit_code == EXIT_USAGE and (dest / "precious.txt").exists()
    (dest / "config.json").write_bytes(files["config.json"])  # already right: kept
    source = SpyLocal(root)
    result = load(source, digest, dest, options(force=True), log=quiet)
    assert "precious.txt" in result.removed and "config.json" not in {p for p, _, _ in source.reads}
    assert (dest / "lost+found").is_dir()
    for bad_dest in (root, root / "sub", tmp_path):
        with pytest.raises(WeightsError) as err:
            load(str(root), digest, bad_dest, options(), log=quiet)
        assert err.value.exit_code == EXIT_USAGE


def test_bad_digest_and_sources_are_usage_errors(model, tmp_path):
    root, _files, digest = model
    for source, pin_ in [(str(root), "sha256:XYZ"), (str(root), digest.upper()), ("pvc://claim/x", digest),
                         ("s3://Bad_Bucket/x", digest), ("file://host/x", digest)]:
        with pytest.raises(WeightsError) as err:
            load(source, pin_, tmp_path / "dest", options(), log=quiet)
        assert err.value.exit_code == EXIT_USAGE, source


def test_a_missing_source_directory_is_a_source_error(tmp_path):
    with pytest.raises(WeightsError) as err:
        load(str(tmp_path / "nope"), "sha256:" + "0" * 64, tmp_path / "dest", options(), log=quiet)
    assert err.value.exit_code == EXIT_SOURCE_ERROR


# --- S3 (moto) -----------------------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def s3(aws_env):
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def upload(client, root, prefix=PREFIX):
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            client.put_object(Bucket=BUCKET, Key=prefix + rel, Body=open(full, "rb").read())


class SpyClient:
    """Records every GetObject (key, range) and raises the injected errors first."""

    def __init__(self, inner, failures=None):
        self.inner = inner
        self.gets = []
        self.failures = failures or {}  # key suffix -> list of exceptions (or "stream") to raise, in order

    def get_object(self, **kw):
        self.gets.append((kw["Key"], kw.get("Range")))
        for suffix, queue in self.failures.items():
            if kw["Key"].endswith(suffix) and queue:
                failure = queue.pop(0)
                if failure == "stream":
                    resp = self.inner.get_object(**kw)
                    resp["Body"] = BrokenBody()
                    return resp
                raise failure
        return self.inner.get_object(**kw)

    def weight_gets(self):
        return [g for g in self.gets if not g[0].endswith(MANIFEST_NAME)]

    def __getattr__(self, name):
        return getattr(self.inner, name)


class BrokenBody:
    def read(self, *args):
        raise ResponseStreamingError(error=ConnectionResetError(104, "Connection reset by peer"))

    def close(self):
        pass


def client_error(code, status):
    return ClientError({"Error": {"Code": code, "Message": "injected"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def s3_source(client, prefix=PREFIX):
    return S3Source(client, S3Location.parse(f"s3://{BUCKET}/{prefix}"))


def test_s3_load_success_and_cache(s3, model, tmp_path):
    root, files, digest = model
    upload(s3, root)
    spy = SpyClient(s3)
    dest = tmp_path / "dest"
    result = load(s3_source(spy), digest, dest, options(), log=quiet)
    assert dest_files(dest) == files and not result.cache_hit
    assert result.downloaded_bytes == sum(len(v) for k, v in files.items() if k != "sub/tokenizer_copy.json")
    big = [r for k, r in spy.gets if k.endswith("model.safetensors")]
    assert len(big) == 6 and all(r.startswith("bytes=") for r in big)  # ranged GETs of PART bytes
    spy.gets.clear()
    assert load(s3_source(spy), digest, dest, options(), log=quiet).cache_hit
    assert spy.gets == []


def test_s3_load_through_client_from_env(s3, model, tmp_path):
    root, files, digest = model
    upload(s3, root)
    result = load(f"s3://{BUCKET}/{PREFIX}", digest, tmp_path / "dest", options(), log=quiet)
    assert result.files == len(files) and dest_files(tmp_path / "dest") == files


def test_s3_wrong_pin_is_refused_before_any_weight_get(s3, model, tmp_path):
    root, _files, _digest = model
    upload(s3, root)
    spy = SpyClient(s3)
    with pytest.raises(WeightsError) as err:
        load(s3_source(spy), "sha256:" + "2" * 64, tmp_path / "dest", options(), log=quiet)
    assert err.value.exit_code == EXIT_DIGEST_MISMATCH
    assert spy.gets == [(PREFIX + MANIFEST_NAME, None)] and spy.weight_gets() == []


def test_s3_flipped_byte(s3, model, tmp_path):
    root, files, digest = model
    upload(s3, root)
    data = bytearray(files["config.json"])
    data[5] ^= 0x20
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "config.json", Body=bytes(data))
    with pytest.raises(WeightsError) as err:
        load(s3_source(s3), digest, tmp_path / "dest", options(), log=quiet)
    assert err.value.exit_code == EXIT_FILE_MISMATCH
    assert "config.json" in err.value.message and f"s3://{BUCKET}/{PREFIX}config.json" in err.value.message
    assert hashlib.sha256(files["config.json"]).hexdigest() in err.value.message
    assert hashlib.sha256(bytes(data)).hexdigest() in err.value.message
    assert not (tmp_path / "dest" / "config.json").exists()


def test_s3_unlisted_objects_are_not_downloaded(s3, model, tmp_path):
    root, files, digest = model
    upload(s3, root)
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "evil.py", Body=b"import os")
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "sub/evil.pkl", Body=b"\x80")
    spy = SpyClient(s3)
    load(s3_source(spy), digest, tmp_path / "dest", options(), log=quiet)
    assert not any("evil" in key for key, _ in spy.gets)
    assert dest_files(tmp_path / "dest") == files


def test_s3_resume_uses_a_ranged_get_from_the_partial_length(s3, model, tmp_path):
    root, files, digest = model
    upload(s3, root)
    dest = tmp_path / "dest"
    (dest / STAGING_DIR).mkdir(parents=True)
    data = files["model.safetensors"]
    done = 3 * PART + 99
    (dest / STAGING_DIR / f"{hashlib.sha256(data).hexdigest()}.part").write_bytes(data[:done])
    spy = SpyClient(s3)
    load(s3_source(spy), digest, dest, options(), log=quiet)
    ranges = sorted(r for k, r in spy.gets if k.endswith("model.safetensors"))
    starts = sorted(int(r.removeprefix("bytes=").split("-")[0]) for r in ranges)
    assert starts[0] == done and len(ranges) == 3  # 2 × PART + 24 bytes were left
    assert dest_files(dest) == files


def test_s3_interrupted_download_leaves_a_part_that_the_next_run_resumes(s3, model, tmp_path):
    root, files, digest = model
    upload(s3, root)
    dest = tmp_path / "dest"
    spy = SpyClient(s3)
    # Let the first two ranges of the big file through, then the storage goes away.
    calls = {"n": 0}
    inner_get = spy.get_object

    def flaky(**kw):
        if kw["Key"].endswith("model.safetensors"):
            calls["n"] += 1
            if calls["n"] > 2:
                raise EndpointConnectionError(endpoint_url="http://s3")
        return inner_get(**kw)

    spy.get_object = flaky
    with pytest.raises(WeightsError) as err:
        load(s3_source(spy), digest, dest, options(concurrency=1), log=quiet)
    assert err.value.exit_code == EXIT_UNREACHABLE
    parts = list((dest / STAGING_DIR).glob("*.part"))
    assert [p.stat().st_size for p in parts] == [2 * PART]
    spy2 = SpyClient(s3)
    load(s3_source(spy2), digest, dest, options(), log=quiet)
    starts = [int(r.removeprefix("bytes=").split("-")[0]) for k, r in spy2.gets if k.endswith("model.safetensors")]
    assert min(starts) == 2 * PART
    assert dest_files(dest) == files


@pytest.mark.parametrize("failure", [
    client_error("SlowDown", 503),
    client_error("InternalError", 500),
    client_error("ThrottlingException", 400),
    client_error("TooManyRequests", 429),
    EndpointConnectionError(endpoint_url="http://s3"),
    ConnectionClosedError(endpoint_url="http://s3"),
    ReadTimeoutError(endpoint_url="http://s3"),
    "stream",
])
def test_s3_transient_errors_are_retried(s3, model, tmp_path, failure):
    root, files, digest = model
    upload(s3, root)
    spy = SpyClient(s3, {"model.safetensors": [failure, failure], MANIFEST_NAME: [failure]})
    logs = Logs()
    load(s3_source(spy), digest, tmp_path / "dest", options(), log=logs)
    assert dest_files(tmp_path / "dest") == files
    assert sum("retrying" in line for line in logs) == 3


def test_s3_retries_are_bounded(s3, model, tmp_path):
    root, _files, digest = model
    upload(s3, root)
    spy = SpyClient(s3, {"model.safetensors": [client_error("SlowDown", 503)] * 100})
    with pytest.raises(WeightsError) as err:
        load(s3_source(spy), digest, tmp_path / "dest", options(concurrency=1), log=quiet)
    assert err.value.exit_code == EXIT_UNREACHABLE and "SlowDown" in err.value.message
    assert len([g for g in spy.gets if g[0].endswith("model.safetensors")]) == FAST.attempts


def test_s3_access_errors_are_not_retried(s3, model, tmp_path):
    root, _files, digest = model
    upload(s3, root)
    spy = SpyClient(s3, {MANIFEST_NAME: [client_error("AccessDenied", 403)]})
    with pytest.raises(WeightsError) as err:
        load(s3_source(spy), digest, tmp_path / "dest", options(), log=quiet)
    assert err.value.exit_code == EXIT_SOURCE_ERROR and "AccessDenied" in err.value.message
    assert len(spy.gets) == 1
    with pytest.raises(WeightsError) as err:
        load(f"s3://no-such-bucket/{PREFIX}", digest, tmp_path / "dest", options(), log=quiet)
    assert err.value.exit_code == EXIT_SOURCE_ERROR and "NoSuchBucket" in err.value.message


def test_s3_without_manifest_downloads_hashes_then_compares(s3, model, tmp_path):
    root, files, digest = model
    (root / MANIFEST_NAME).unlink()
    upload(s3, root)
    spy = SpyClient(s3)
    logs = Logs()
    load(s3_source(spy), digest, tmp_path / "d1", options(), log=logs)
    assert dest_files(tmp_path / "d1") == files
    assert any("no slmfleet-manifest.json" in line for line in logs)
    with pytest.raises(WeightsError) as err:
        load(s3_source(s3), "sha256:" + "3" * 64, tmp_path / "d2", options(), log=quiet)
    assert err.value.exit_code == EXIT_DIGEST_MISMATCH and digest in err.value.message
    assert dest_files(tmp_path / "d2") == {}  # nothing was put in place
    # Pickle files are refused from the listing, before anything is downloaded.
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "optimizer.pt", Body=b"\x80")
    spy = SpyClient(s3)
    with pytest.raises(WeightsError) as err:
        load(s3_source(spy), digest, tmp_path / "d3", options(), log=quiet)
    assert err.value.exit_code == EXIT_REFUSED_FORMAT and spy.weight_gets() == []


def test_s3_missing_object_is_a_file_mismatch(s3, model, tmp_path):
    root, _files, digest = model
    upload(s3, root)
    s3.delete_object(Bucket=BUCKET, Key=PREFIX + "config.json")
    with pytest.raises(WeightsError) as err:
        load(s3_source(s3), digest, tmp_path / "dest", options(), log=quiet)
    assert err.value.exit_code == EXIT_FILE_MISMATCH and "config.json" in err.value.message
    assert "no such file in the source" in err.value.message


def test_identical_content_is_fetched_once_even_if_one_copy_is_missing(s3, model, tmp_path):
    root, files, digest = model
    upload(s3, root)
    s3.delete_object(Bucket=BUCKET, Key=PREFIX + "tokenizer.json")  # same bytes as sub/tokenizer_copy.json
    load(s3_source(s3), digest, tmp_path / "dest", options(), log=quiet)
    assert dest_files(tmp_path / "dest") == files  # exactly the pinned bytes, from the other copy


def test_s3_many_files_concurrently(s3, tmp_path):
    root = tmp_path / "model"
    root.mkdir()
    files = {f"shard-{i:02d}.safetensors": os.urandom(PART * (i % 3) + i * 1000) for i in range(12)}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    digest = pin(str(root), write=True, log=quiet).digest
    upload(s3, root)
    load(s3_source(s3), digest, tmp_path / "dest", options(concurrency=6), log=quiet)
    assert dest_files(tmp_path / "dest") == files


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: nothing listens there


def test_unreachable_endpoint_fails_quickly_with_bounded_retries(aws_env, tmp_path):
    port = closed_port()
    factory = lambda: client_from_env({"endpoint_url": f"http://127.0.0.1:{port}", "max_attempts": 1,  # noqa: E731
                                        "connect_timeout": 1, "read_timeout": 1})
    logs = Logs()
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as err:
        load(f"s3://{BUCKET}/{PREFIX}", "sha256:" + "0" * 64, tmp_path / "dest",
             options(retry=RetryPolicy(attempts=3, initial_wait=0.01, max_wait=0.05)), log=logs,
             client_factory=factory)
    assert time.monotonic() - t0 < 10
    assert err.value.exit_code == EXIT_UNREACHABLE
    assert f"127.0.0.1:{port}" in err.value.message and "3 attempts" in err.value.message
    assert sum("retrying" in line for line in logs) == 2
    assert "testing" not in err.value.message + "".join(logs)  # no secrets
