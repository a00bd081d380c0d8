"""Pure helpers of images/build.py: layer normalization and the digests file."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from images import build

EPOCH = 1_700_000_000
DIGEST = "sha256:" + "ab" * 32


def _tree(root: Path, *, mtime: int, mode_extra: int = 0) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("A = 1\n")
    (root / "pkg" / "sub" / "b.txt").write_text("b\n")
    (root / "pkg-data").write_text("sorted between pkg and pkg/...\n")
    os.link(root / "pkg" / "a.py", root / "pkg" / "z-hardlink.py")
    os.symlink("a.py", root / "pkg" / "link.py")
    (root / "pkg" / "run").write_text("#!/bin/sh\n")
    (root / "pkg" / "run").chmod(0o755 | mode_extra)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (mtime, mtime), follow_symlinks=False)
    return root


def _all_paths(root: Path) -> list[str]:
    return [os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs]


def _members(layer: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(layer, "r:gz") as tar:
        return tar.getmembers()


def test_same_files_give_the_same_layer_whatever_their_mtimes_and_walk_order(tmp_path):
    a = _tree(tmp_path / "a", mtime=EPOCH + 5000)
    b = _tree(tmp_path / "b", mtime=EPOCH + 99999)
    paths_a = _all_paths(a)
    paths_b = list(reversed(_all_paths(b)))
    la = build.write_layer(a, paths_a, tmp_path / "a.tar.gz", epoch=EPOCH, owner=(0, 0))
    lb = build.write_layer(b, paths_b, tmp_path / "b.tar.gz", epoch=EPOCH, owner=(0, 0))
    assert la == lb
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()


def test_layer_digests_are_those_of_the_gzip_and_of_the_tar(tmp_path):
    root = _tree(tmp_path / "r", mtime=EPOCH)
    out = tmp_path / "l.tar.gz"
    meta = build.write_layer(root, _all_paths(root), out, epoch=EPOCH)
    blob = out.read_bytes()
    assert meta["digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert meta["size"] == len(blob)
    assert meta["diffID"] == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    # gzip header: no file name, mtime 0.
    assert blob[3] & 0x08 == 0
    assert blob[4:8] == b"\0\0\0\0"


def test_a_different_content_or_mode_changes_the_digest(tmp_path):
    a = _tree(tmp_path / "a", mtime=EPOCH)
    b = _tree(tmp_path / "b", mtime=EPOCH, mode_extra=0o020)
    c = _tree(tmp_path / "c", mtime=EPOCH)
    (c / "pkg" / "sub" / "b.txt").write_text("B\n")
    digests = {build.write_layer(r, _all_paths(r), tmp_path / f"{r.name}.tar.gz", epoch=EPOCH)["digest"]
               for r in (a, b, c)}
    assert len(digests) == 3


def test_layer_entries_are_sorted_normalized_and_keep_links(tmp_path):
    root = _tree(tmp_path / "r", mtime=EPOCH + 10)
    out = tmp_path / "l.tar.gz"
    build.write_layer(root, _all_paths(root), out, epoch=EPOCH, owner=(0, 0))
    members = _members(out)
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names.index("pkg") < names.index("pkg/a.py")
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert m.mtime == EPOCH
        assert m.pax_headers == {}
    by_name = {m.name: m for m in members}
    assert by_name["pkg/z-hardlink.py"].islnk() and by_name["pkg/z-hardlink.py"].linkname == "pkg/a.py"
    assert by_name["pkg/link.py"].issym() and by_name["pkg/link.py"].linkname == "a.py"
    assert by_name["pkg/run"].mode & 0o777 == 0o755


def test_older_mtimes_are_kept_and_base_owners_too(tmp_path):
    info = tarfile.TarInfo("x")
    info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH - 10.5, 5, 8, "games", "mail"
    out = build.normalize_tarinfo(info, EPOCH)
    assert (out.mtime, out.uid, out.gid, out.uname, out.gname) == (EPOCH - 11, 5, 8, "", "")
    assert isinstance(out.mtime, int)
    assert build.normalize_tarinfo(tarfile.TarInfo("y"), EPOCH, owner=(0, 0)).uid == 0


def test_a_long_path_gets_a_pax_record_and_stays_deterministic(tmp_path):
    for name in ("a", "b"):
        d = tmp_path / name / ("d" * 120) / ("e" * 60)
        d.mkdir(parents=True)
        (d / "f.py").write_text("x\n")
    la = build.write_layer(tmp_path / "a", _all_paths(tmp_path / "a"), tmp_path / "a.tar.gz", epoch=EPOCH, owner=(0, 0))
    lb = build.write_layer(tmp_path / "b", _all_paths(tmp_path / "b"), tmp_path / "b.tar.gz", epoch=EPOCH, owner=(0, 0))
    assert la["digest"] == lb["digest"]
    assert any(m.name.endswith("/f.py") and len(m.name) > 100 for m in _members(tmp_path / "a.tar.gz"))


def test_layer_paths_sort_and_drop_duplicates_and_slashes():
    assert build.layer_paths(["b/c", "/a/", "b", "a", "", "a-b"]) == ["a", "a-b", "b", "b/c"]


def _images(tmp_path: Path) -> dict:
    return {"slmfleet": {"repository": "slmfleet/slmfleet", "tag": "0.1.0", "digest": DIGEST,
                         "layout": str(tmp_path / "images" / "slmfleet"), "compressedBytes": 123}}


def test_digests_document_has_exactly_the_agreed_shape(tmp_path):
    doc = build.digests_document(_images(tmp_path), "abc123")
    assert doc == {"images": {"slmfleet": {"repository": "slmfleet/slmfleet", "tag": "0.1.0", "digest": DIGEST,
                                           "layout": str(tmp_path / "images" / "slmfleet"),
                                           "compressedBytes": 123}},
                   "revision": "abc123"}
    path = tmp_path / "images.json"
    path.write_text(json.dumps(doc))
    assert build.read_digests(path) == doc
    assert build.image_ref(doc["images"]["slmfleet"]) == f"slmfleet/slmfleet:0.1.0@{DIGEST}"


@pytest.mark.parametrize("field,value", [
    ("digest", "sha256:abc"),
    ("digest", "sha512:" + "ab" * 32),
    ("digest", "sha256:" + "AB" * 32),
    ("layout", "build/images/slmfleet"),
    ("compressedBytes", 0),
    ("repository", "slmfleet/slmfleet:0.1.0"),
])
def test_digests_document_refuses_a_bad_entry(tmp_path, field, value):
    images = _images(tmp_path)
    images["slmfleet"][field] = value
    with pytest.raises(ValueError):
        build.digests_document(images, "abc123")


def test_read_digests_refuses_other_keys(tmp_path):
    doc = build.digests_document(_images(tmp_path), "abc123")
    doc["images"]["slmfleet"]["extra"] = 1
    path = tmp_path / "images.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="keys"):
        build.read_digests(path)
    doc = build.digests_document(_images(tmp_path), "abc123")
    doc["built"] = "now"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="keys"):
        build.read_digests(path)


def test_cache_keys_change_with_their_inputs_only():
    assert build.cache_key({"a": 1, "b": [1, 2]}) == build.cache_key({"b": [1, 2], "a": 1})
    assert build.cache_key({"a": 1}) != build.cache_key({"a": 2})


def test_read_layout_sums_config_and_layers(tmp_path):
    layout = tmp_path / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"digest": "sha256:" + d, "size": len(data)}

    config = put(json.dumps({"architecture": "amd64", "os": "linux"}).encode())
    layers = [put(b"x" * 10), put(b"y" * 20)]
    manifest = json.dumps({"schemaVersion": 2, "config": config, "layers": layers}).encode()
    m = put(manifest)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [m]}))
    got = build.read_layout(layout)
    assert got["digest"] == m["digest"]
    assert got["compressedBytes"] == config["size"] + 30
    assert got["config"]["architecture"] == "amd64"


def test_labels_say_the_standin_is_not_vllm():
    project = build.Project.read()
    assert project.version == "0.1.0"
    labels = build._labels("vllm-standin-test", "TEST STAND-IN, NOT vLLM", project, "rev", {"io.slmfleet.test-only": "true"})
    assert labels["io.slmfleet.test-only"] == "true"
    assert labels["org.opencontainers.image.revision"] == "rev"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
