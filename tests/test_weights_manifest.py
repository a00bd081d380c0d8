"""Weight manifests: canonical bytes, digests, hashing, directory walks, strict parsing."""

import hashlib
import json
import os

import boto3
import pytest
from moto import mock_aws

from slmfleet.weights.manifest import (
    MANIFEST_NAME,
    STAGING_DIR,
    VERIFIED_MARKER,
    FileEntry,
    Manifest,
    ManifestError,
    hash_file,
    is_digest,
    list_directory,
    manifest_of_directory,
    validate_path,
)
from slmfleet.weights.pin import pin
from slmfleet.weights.s3 import S3Location
from slmfleet.weights.transfer import LocalSource, RetryPolicy, S3Source

A = "a" * 64
B = "b" * 64


def model_dir(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "qwen2"}')
    (root / "model.safetensors").write_bytes(os.urandom(300_000))
    (root / "sub" / "tokenizer.json").write_text("{}")
    (root / "sub" / "deeper" / "ünïcode name.txt").write_text("x")
    (root / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (root / "empty").write_bytes(b"")
    return root


def test_canonical_bytes_and_digest():
    m = Manifest.of([FileEntry("z.json", 2, B), FileEntry("a/b.safetensors", 10, A)])
    expected = ('{"files":[{"path":"a/b.safetensors","sha256":"' + A + '","size":10},'
                '{"path":"z.json","sha256":"' + B + '","size":2}],"version":1}').encode()
    assert m.canonical_bytes == expected
    assert m.digest == "sha256:" + hashlib.sha256(expected).hexdigest()
    assert is_digest(m.digest) and not is_digest(m.digest.upper()) and not is_digest("sha256:abc")
    assert m.total_size == 12 and [f.path for f in m.files] == ["a/b.safetensors", "z.json"]
    assert Manifest.parse(m.canonical_bytes) == m


def test_digest_does_not_depend_on_order_or_whitespace():
    m1 = Manifest.of([FileEntry("b", 1, A), FileEntry("a", 2, B)])
    m2 = Manifest.of([FileEntry("a", 2, B), FileEntry("b", 1, A)])
    pretty = json.dumps({"version": 1, "files": [f.to_json() for f in reversed(m1.files)]}, indent=4)
    assert m1.digest == m2.digest == Manifest.parse(pretty).digest


def test_paths_sort_by_code_point():
    m = Manifest.of([FileEntry(p, 0, A) for p in ["b", "B", "a/z", "a-z", "é", "a"[0] + "0"]])
    assert [f.path for f in m.files] == sorted(f.path for f in m.files)
    assert [f.path for f in m.files] == sorted((f.path for f in m.files), key=lambda p: p.encode())


@pytest.mark.parametrize("bad", ["../x", "a/../b", "/etc/passwd", "a//b", "./a", "a/", "a/.", "", "a\\b",
                                 "a\x00b", MANIFEST_NAME, VERIFIED_MARKER, f"{STAGING_DIR}/x"])
def test_unsafe_paths_are_refused(bad):
    with pytest.raises(ManifestError):
        validate_path(bad)
    doc = {"files": [{"path": bad, "size": 1, "sha256": A}], "version": 1}
    with pytest.raises(ManifestError):
        Manifest.parse(json.dumps(doc))


def test_reserved_names_are_only_reserved_at_the_top():
    assert validate_path(f"sub/{MANIFEST_NAME}") == f"sub/{MANIFEST_NAME}"


@pytest.mark.parametrize("doc", [
    [],
    {"files": []},
    {"files": [], "version": 2},
    {"files": [], "version": True},
    {"files": [], "version": 1, "extra": 1},
    {"files": {}, "version": 1},
    {"files": [{"path": "a", "size": 1}], "version": 1},
    {"files": [{"path": "a", "size": 1, "sha256": A, "mode": 420}], "version": 1},
    {"files": [{"path": "a", "size": -1, "sha256": A}], "version": 1},
    {"files": [{"path": "a", "size": True, "sha256": A}], "version": 1},
    {"files": [{"path": "a", "size": 1.0, "sha256": A}], "version": 1},
    {"files": [{"path": "a", "size": 1, "sha256": A.upper()}], "version": 1},
    {"files": [{"path": "a", "size": 1, "sha256": "sha256:" + A}], "version": 1},
    {"files": [{"path": "a", "size": 1, "sha256": A}, {"path": "a", "size": 1, "sha256": A}], "version": 1},
    {"files": [{"path": "a", "size": 1, "sha256": A}, {"path": "a/b", "size": 1, "sha256": A}], "version": 1},
])
def test_invalid_manifests_are_refused(doc):
    with pytest.raises(ManifestError):
        Manifest.parse(json.dumps(doc))


def test_duplicate_json_keys_and_non_json_are_refused():
    with pytest.raises(ManifestError, match="duplicate"):
        Manifest.parse('{"files": [], "files": [], "version": 1}')
    for junk in (b"\xff\xfe", b"not json", b""):
        with pytest.raises(ManifestError):
            Manifest.parse(junk)


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 5000])
def test_hash_file_matches_hashlib(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert hash_file(tmp_path / "f", chunk_size=1024) == (size, hashlib.sha256(data).hexdigest())


def test_manifest_of_directory(tmp_path):
    root = model_dir(tmp_path / "m")
    (root / MANIFEST_NAME).write_text("whatever")
    (root / VERIFIED_MARKER).write_text("whatever")
    (root / STAGING_DIR).mkdir()
    (root / STAGING_DIR / "x.part").write_text("partial")
    (root / "sub" / MANIFEST_NAME).write_text("a nested file of that name is a file like any other")
    m = manifest_of_directory(root, workers=3)
    assert [f.path for f in m.files] == [".gitattributes", "config.json", "empty", "model.safetensors",
                                         "sub/deeper/ünïcode name.txt", f"sub/{MANIFEST_NAME}", "sub/tokenizer.json"]
    for f in m.files:
        data = (root / f.path).read_bytes()
        assert (f.size, f.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert manifest_of_directory(root, workers=1) == m


def test_the_manifest_is_not_part_of_itself(tmp_path):
    root = model_dir(tmp_path / "m")
    before = pin(str(root), write=True, log=lambda _: None)
    assert (root / MANIFEST_NAME).read_bytes() == before.manifest.canonical_bytes
    assert before.digest == "sha256:" + hashlib.sha256((root / MANIFEST_NAME).read_bytes()).hexdigest()
    after = pin(str(root), log=lambda _: None)
    assert after.digest == before.digest and after.previous_digest == before.digest


def test_digest_does_not_depend_on_the_location(tmp_path):
    a = model_dir(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    b.mkdir(parents=True)
    for rel, path in list_directory(a):
        (b / rel).parent.mkdir(parents=True, exist_ok=True)
        (b / rel).write_bytes(path.read_bytes())
    assert manifest_of_directory(a).digest == manifest_of_directory(b).digest
    (b / "config.json").write_text('{"model_type": "qwen3"}')
    assert manifest_of_directory(a).digest != manifest_of_directory(b).digest


def test_symlinks_are_followed_like_a_hugging_face_snapshot(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "1234").write_text('{"model_type": "llama"}')
    snap = tmp_path / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to(blobs / "1234")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    assert manifest_of_directory(snap).digest == manifest_of_directory(plain).digest


def test_symlink_loops_and_dangling_links_are_errors(tmp_path):
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "self").symlink_to(tmp_path / "loop")
    with pytest.raises(ManifestError, match="twice"):
        manifest_of_directory(tmp_path / "loop")
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "x").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="dangling"):
        manifest_of_directory(tmp_path / "dangling")


def test_same_files_on_s3_give_the_same_digest(tmp_path, monkeypatch):
    root = model_dir(tmp_path / "m")
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="weights")
        for rel, path in list_directory(root):
            client.put_object(Bucket="weights", Key=f"models/m/{rel}", Body=path.read_bytes())
        client.put_object(Bucket="weights", Key="models/m/sub/", Body=b"")  # a "folder" marker
        client.put_object(Bucket="weights", Key="models/other/config.json", Body=b"{}")  # outside the prefix
        source = S3Source(client, S3Location.parse("s3://weights/models/m"))
        on_s3 = pin(source, concurrency=3, part_size=64 * 1024, retry=RetryPolicy(attempts=1), log=lambda _: None)
        local = pin(LocalSource(root), log=lambda _: None)
        assert on_s3.manifest == local.manifest and on_s3.digest == local.digest
        # --write on S3 stores the same canonical bytes beside the weights.
        pin(source, write=True, log=lambda _: None)
        stored = client.get_object(Bucket="weights", Key=f"models/m/{MANIFEST_NAME}")["Body"].read()
        assert stored == local.manifest.canonical_bytes
        assert pin(source, log=lambda _: None).digest == local.digest  # the stored manifest is excluded
