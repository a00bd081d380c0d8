"""Every read of the weights is bounded (issue 13): S3 bodies are read in chunks up to a cap,
whatever Content-Length says and whether or not the store honours Range; safetensors headers and
manifests have documented limits, enforced before anything big is read or built.

Two kinds of storage stand in for a hostile or broken S3: fake botocore-like bodies that never
end (they count what was read), and a loopback HTTP server on 127.0.0.1 that boto3 really talks
to, which ignores Range and can stream an object forever without a Content-Length."""

from __future__ import annotations

import hashlib
import http.server
import json
import struct
import threading
import time

import pytest

from slmfleet.weights import manifest as manifest_mod
from slmfleet.weights import s3 as s3mod
from slmfleet.weights import transfer as transfer_mod
from slmfleet.weights.errors import DigestMismatch
from slmfleet.weights.inspect import inspect_s3
from slmfleet.weights.loader import load
from slmfleet.weights.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_FILES,
    MAX_PATH_BYTES,
    FileEntry,
    Manifest,
    ManifestError,
    json_counts,
    json_within,
    list_directory,
)
from slmfleet.weights.safetensors import (
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    SafetensorsError,
    parse_header,
    read_header,
    tensor_bytes,
)
from slmfleet.weights.transfer import S3Source

MARKER = "REMOTE-MARKER-7f3a"  # text a hostile server sends; it must never reach an error


# --- fake botocore bodies --------------------------------------------------------------------------


class EndlessBody:
    """A StreamingBody that never ends (or ends after `size` bytes), counting what was read."""

    def __init__(self, size: int | None = None, fill: bytes = MARKER.encode()):
        self.size, self.fill, self.read_bytes, self.calls, self.closed = size, fill, 0, [], False

    def read(self, amt=None):
        if amt is None:
            raise AssertionError("read() without a size reads the whole body")
        self.calls.append(amt)
        left = amt if self.size is None else min(amt, self.size - self.read_bytes)
        at = self.read_bytes % len(self.fill)  # the fill repeated, from where the last read ended
        chunk = (self.fill * ((at + left) // len(self.fill) + 1))[at:at + left]
        self.read_bytes += len(chunk)
        return chunk

    def close(self):
        self.closed = True


class FakeClient:
    """get_object answers from `responses` (key -> callable(range) -> response dict)."""

    def __init__(self, responses):
        self.responses, self.gets = responses, []

    def get_object(self, Bucket, Key, Range=None):
        self.gets.append((Key, Range))
        return self.responses[Key](Range)


def response(body, *, status=200, length=None, content_range=None):
    resp = {"Body": body, "ResponseMetadata": {"HTTPStatusCode": status}}
    if length is not None:
        resp["ContentLength"] = length
    if content_range is not None:
        resp["ContentRange"] = content_range
    return resp


def test_a_body_without_content_length_is_read_only_up_to_the_cap():
    body = EndlessBody()
    client = FakeClient({"k": lambda r: response(body)})
    with pytest.raises(s3mod.ReadLimitExceeded) as err:
        s3mod.get_capped(client, "b", "k", 1000)
    assert body.read_bytes == 1001 and body.closed and max(body.calls) <= s3mod.READ_CHUNK
    assert str(err.value) == "s3://b/k is larger than 1000 bytes" and MARKER not in str(err.value)


def test_a_lying_content_length_does_not_lift_the_cap():
    body = EndlessBody()
    client = FakeClient({"k": lambda r: response(body, length=10)})
    with pytest.raises(s3mod.ReadLimitExceeded):
        s3mod.get_capped(client, "b", "k", 3 * s3mod.READ_CHUNK)
    assert body.read_bytes == 3 * s3mod.READ_CHUNK + 1
    assert all(n <= s3mod.READ_CHUNK for n in body.calls)  # in chunks, never one big read


def test_a_large_content_length_is_refused_before_reading():
    body = EndlessBody()
    client = FakeClient({"k": lambda r: response(body, length=10**12)})
    with pytest.raises(s3mod.ReadLimitExceeded):
        s3mod.get_capped(client, "b", "k", 1000)
    assert body.read_bytes == 0 and body.closed


def test_a_small_object_is_read_whole():
    body = EndlessBody(size=999)
    assert len(s3mod.get_capped(FakeClient({"k": lambda r: response(body, length=999)}), "b", "k", 1000)) == 999
    body = EndlessBody(size=1000)
    assert len(s3mod.get_capped(FakeClient({"k": lambda r: response(body)}), "b", "k", 1000)) == 1000


def test_a_store_that_ignores_range_is_not_read_whole():
    data = bytes(range(256)) * 64
    body = EndlessBody(fill=data)  # 200, no Content-Range: the whole object, and it never ends
    client = FakeClient({"k": lambda r: response(body)})
    assert s3mod.read_range(client, "b", "k", 300, 100) == (data * 2)[300:400]
    assert body.read_bytes == 400 and body.closed  # skipped 300, read 100, left the rest
    assert client.gets == [("k", "bytes=300-399")]


def test_a_ranged_answer_longer_than_asked_is_refused():
    body = EndlessBody()
    client = FakeClient({"k": lambda r: response(body, status=206, content_range="bytes 0-7/100")})
    with pytest.raises(s3mod.ReadLimitExceeded, match="bytes 0-7"):
        s3mod.read_range(client, "b", "k", 0, 8)
    assert body.read_bytes == 9


def test_inspect_refuses_an_endless_manifest_without_echoing_it():
    body = EndlessBody()
    client = FakeClient({"q/slmfleet-manifest.json": lambda r: response(body)})
    facts = inspect_s3(client, "s3://models/q/", "sha256:" + "0" * 64, allow_pickle=False)
    assert facts.problem == "WeightsUnreadable"
    assert f"larger than {MAX_MANIFEST_BYTES} bytes" in facts.message
    assert MARKER not in facts.message and len(facts.message) < 300
    assert body.read_bytes == MAX_MANIFEST_BYTES + 1 and body.closed


def test_inspect_refuses_an_endless_config_after_the_manifest():
    config = b'{"model_type": "llama"}'
    manifest = Manifest.of([FileEntry("config.json", len(config), hashlib.sha256(config).hexdigest())])
    body = EndlessBody()
    client = FakeClient({
        "q/slmfleet-manifest.json": lambda r: response(EndlessBody(size=len(manifest.canonical_bytes),
                                                                   fill=manifest.canonical_bytes)),
        "q/config.json": lambda r: response(body),  # no Content-Length, and it never ends
    })
    facts = inspect_s3(client, "s3://models/q/", manifest.digest, allow_pickle=False)
    assert facts.problem == "WeightsUnreadable" and "config.json is larger than" in facts.message
    assert MARKER not in facts.message


def test_the_loader_refuses_an_endless_manifest_before_any_weight(tmp_path):
    body = EndlessBody()
    client = FakeClient({"q/slmfleet-manifest.json": lambda r: response(body)})
    source = S3Source(client, s3mod.S3Location.parse("s3://models/q/"))
    with pytest.raises(DigestMismatch, match=f"larger than {MAX_MANIFEST_BYTES} bytes") as err:
        load(source, "sha256:" + "0" * 64, tmp_path / "dest", log=lambda m: None)
    assert body.read_bytes == MAX_MANIFEST_BYTES + 1 and MARKER not in err.value.message
    assert [k for k, _ in client.gets] == ["q/slmfleet-manifest.json"]


def test_the_loader_range_reads_stop_at_the_range_on_a_store_that_ignores_range():
    data = bytes(range(256)) * 64  # the object is `data`, served whole whatever the Range
    bodies = []

    def whole(_range):
        bodies.append(EndlessBody(size=len(data), fill=data))
        return response(bodies[-1], length=len(data))

    source = S3Source(FakeClient({"q/w.bin": whole}), s3mod.S3Location.parse("s3://models/q/"))
    assert source.get_range("w.bin", 1000, 500) == data[1000:1500]
    assert bodies[-1].read_bytes == 1500 and bodies[-1].closed
    with pytest.raises(transfer_mod.SourceTooShort):  # its Content-Length is the object's size
        source.get_range("w.bin", len(data) - 10, 20)


# --- a loopback S3 stand-in that ignores Range -----------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # no Content-Length needed: the body ends when the connection does
    objects: dict[str, bytes] = {}
    sent: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):  # http.server calls it by this name
        key = self.path.split("?")[0].lstrip("/")
        self.send_response(200)  # the Range header is ignored
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        chunk = (MARKER.encode() * 4096)[:65536]
        try:
            if key in self.objects:
                self.wfile.write(self.objects[key])
                self.sent[key] = self.sent.get(key, 0) + len(self.objects[key])
                return
            while True:  # any other key: an endless object without Content-Length
                self.wfile.write(chunk)
                self.sent[key] = self.sent.get(key, 0) + len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def loopback_s3():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    _Handler.objects, _Handler.sent = {}, {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings = s3mod.S3Settings(endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", region="us-east-1",
                                addressing_style="path", max_attempts=1, read_timeout=10, connect_timeout=5)
    try:
        yield settings.client(anonymous=True), _Handler
    finally:
        server.shutdown()
        server.server_close()


def within(seconds, fn, *args):
    """fn(*args) on a thread; fails (instead of hanging) if it has not returned in time."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still reading after {seconds} s: the read is not bounded"
    return out, time.monotonic() - t0


def test_loopback_endless_object_stops_at_the_cap(loopback_s3):
    client, _ = loopback_s3
    out, _ = within(20, s3mod.get_capped, client, "models", "q/endless.json", 256 * 1024)
    assert isinstance(out.get("error"), s3mod.ReadLimitExceeded), out
    assert MARKER not in str(out["error"])


def test_loopback_ranged_reads_of_an_endless_object_that_ignores_range(loopback_s3):
    client, _ = loopback_s3
    out, _ = within(20, s3mod.read_range, client, "models", "q/endless.bin", 10, 8)
    assert out.get("value") == (MARKER.encode() * 2)[10:18], out


def test_loopback_safetensors_header_through_a_store_that_ignores_range(loopback_s3):
    client, handler = loopback_s3
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]}}).encode()
    handler.objects["models/q/model.safetensors"] = struct.pack("<Q", len(header)) + header + b"\x00" * (8 << 20)
    out, _ = within(20, read_header, lambda start, n: s3mod.read_range(client, "models", "q/model.safetensors",
                                                                        start, n))
    assert tensor_bytes(out["value"]) == 64


def test_loopback_inspect_with_an_endless_manifest(loopback_s3):
    client, _ = loopback_s3
    out, _ = within(30, lambda: inspect_s3(client, "s3://models/q/", "sha256:" + "0" * 64, allow_pickle=False))
    facts = out["value"]
    assert facts.problem == "WeightsUnreadable" and "larger than" in facts.message
    assert MARKER not in facts.message


# --- safetensors headers ---------------------------------------------------------------------------


def test_a_header_claiming_100_mb_is_refused_after_eight_bytes():
    reads = []

    def read(start, length):
        reads.append((start, length))
        return struct.pack("<Q", 100_000_000) if start == 0 else b"{}" * (length // 2)

    t0 = time.perf_counter()
    with pytest.raises(SafetensorsError, match=f"exceeds {MAX_HEADER_BYTES} bytes"):
        read_header(read)
    assert reads == [(0, 8)]  # the header itself is never requested, nothing is allocated for it
    assert time.perf_counter() - t0 < 0.5
    assert MAX_HEADER_BYTES == 16 * 1024 * 1024


def _header(n: int, dims: int = 2) -> bytes:
    entries = {f"t{i}": {"dtype": "U8", "shape": [1] * dims, "data_offsets": [i, i + 1]} for i in range(n)}
    return json.dumps(entries, separators=(",", ":")).encode()


def test_tensor_count_and_shape_limits():
    assert len(parse_header(_header(1000))) == 1000
    with pytest.raises(SafetensorsError, match=f"more than {MAX_TENSORS} tensors"):
        parse_header(_header(MAX_TENSORS + 1, dims=1))
    with pytest.raises(SafetensorsError, match=f"at most {MAX_DIMS}"):
        parse_header(_header(1, dims=MAX_DIMS + 1))


@pytest.mark.parametrize("junk", [
    b"[" + b"[]," * 3_000_000 + b"[]]",  # millions of empty lists: refused by the count, never built
    b'{"__metadata__":{' + b",".join(b'"k%d":"v"' % i for i in range(200_000)) + b"}}",
    b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the parser's recursion
    b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,1]}}',  # an int of 5,000 digits
])
def test_hostile_headers_are_refused_quickly(junk, monkeypatch):
    t0 = time.perf_counter()
    with pytest.raises(SafetensorsError):
        parse_header(junk[:MAX_HEADER_BYTES])
    assert time.perf_counter() - t0 < 2


def test_the_count_refuses_before_parsing(monkeypatch):
    import slmfleet.weights.safetensors as st

    def no_parse(*args, **kw):
        raise AssertionError("parsed")

    monkeypatch.setattr(st.json, "loads", no_parse)
    with pytest.raises(SafetensorsError, match="more JSON"):
        parse_header(b"[" + b"[]," * 1_000_000 + b"[]]")


def test_error_messages_quote_header_values_briefly():
    header = json.dumps({"x" * 10_000: {"dtype": MARKER * 1000, "shape": [1], "data_offsets": [0, 1]}}).encode()
    with pytest.raises(SafetensorsError) as err:
        parse_header(header)
    assert len(str(err.value)) < 400


# --- manifests -------------------------------------------------------------------------------------


def _entries(n: int, path_len: int = 20) -> list[FileEntry]:
    return [FileEntry(f"{i:08d}".ljust(path_len, "x"), i, hashlib.sha256(b"%d" % i).hexdigest()) for i in range(n)]


def test_a_manifest_at_the_limits_parses_and_one_more_file_is_refused():
    # The most files, each path of the longest length: still within the byte limit.
    full = Manifest.of(_entries(MAX_MANIFEST_FILES, MAX_PATH_BYTES))
    assert len(full.canonical_bytes) <= MAX_MANIFEST_BYTES
    t0 = time.perf_counter()
    assert Manifest.parse(full.canonical_bytes).digest == full.digest
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ManifestError, match=f"more than the {MAX_MANIFEST_FILES}"):
        Manifest.of(_entries(MAX_MANIFEST_FILES + 1))
    doc = {"files": [e.to_json() for e in _entries(MAX_MANIFEST_FILES + 1)], "version": 1}
    with pytest.raises(ManifestError, match=str(MAX_MANIFEST_FILES)):
        Manifest.parse(json.dumps(doc))


def test_paths_longer_than_the_limit_are_refused():
    with pytest.raises(ManifestError, match=f"longer than {MAX_PATH_BYTES} bytes") as err:
        FileEntry("a" * (MAX_PATH_BYTES + 1), 1, "0" * 64)
    assert len(str(err.value)) < 200
    with pytest.raises(ManifestError, match="longer than"):  # bytes, not characters
        FileEntry("é" * (MAX_PATH_BYTES // 2 + 1), 1, "0" * 64)


def test_an_oversized_or_bloated_manifest_is_refused_before_parsing(monkeypatch):
    with pytest.raises(ManifestError, match=f"larger than {MAX_MANIFEST_BYTES} bytes"):
        Manifest.parse(b" " * (MAX_MANIFEST_BYTES + 1))

    def no_parse(*args, **kw):
        raise AssertionError("parsed")

    monkeypatch.setattr(manifest_mod.json, "loads", no_parse)
    for junk in (b'{"files":[' + b"[]," * 100_000 + b'[]],"version":1}',
                 b'{"files":[' + b'{"a":1},' * 20_000 + b'{}],"version":1}'):
        with pytest.raises(ManifestError, match="more JSON values"):
            Manifest.parse(junk)


def test_hostile_manifests_are_refused_with_short_messages():
    for doc in ({"files": [{"path": "a", "size": 1, "sha256": MARKER * 10_000}], "version": 1},
                {"files": [{"path": MARKER * 10_000, "size": 1, "sha256": "0" * 64}], "version": 1},
                {"files": [{"path": "a", "size": 1, "sha256": "0" * 64, MARKER * 1000: 1}], "version": 1},
                {"files": [], "version": MARKER * 10_000}):
        with pytest.raises(ManifestError) as err:
            Manifest.parse(json.dumps(doc))
        assert len(str(err.value)) < 400, str(err.value)[:100]
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.parse(b'{"files":' + b"[" * 10 + b"]" * 10 + b',"version":' + b"9" * 5000 + b"}")


def test_json_counts_step_over_strings():
    assert json_counts(b'{"a,b:[{": [1, 2, {"c": "d\\",:"}]}') == (2, 1, 4)
    assert json_counts(b'["\\\\", ","]') == (0, 1, 1)  # an escaped backslash ends before the quote
    assert json_within(b'["a,b,c,d,e"]', objects=0, arrays=1, items=0)
    assert not json_within(b'[1,2,3]', objects=0, arrays=1, items=1)


def test_directory_and_s3_listings_stop_past_the_file_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST_FILES", 5)
    monkeypatch.setattr(transfer_mod, "MAX_MANIFEST_FILES", 5)
    for i in range(7):
        (tmp_path / f"f{i}").write_bytes(b"x")
    with pytest.raises(ManifestError, match="more than the 5 files"):
        list_directory(tmp_path)

    class Pages:
        def __init__(self):
            self.listed = 0

        def paginate(self, **kw):
            for page in range(1000):  # an endless listing, 10 objects a page
                self.listed += 10
                yield {"Contents": [{"Key": f"q/{page}-{i}", "Size": 1} for i in range(10)]}

    pages = Pages()

    class Lister:
        def get_paginator(self, name):
            return pages

    source = S3Source(Lister(), s3mod.S3Location.parse("s3://models/q/"))
    with pytest.raises(ManifestError, match="more than the 5 files"):
        source.list_files()
    assert pages.listed == 10  # stopped on the first page


def test_the_loader_without_a_manifest_refuses_a_huge_listing(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST_FILES", 3)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(b"x")
    with pytest.raises(DigestMismatch, match="more than the 3 files"):
        load(str(src), "sha256:" + "0" * 64, tmp_path / "dest", log=lambda m: None)
    assert MANIFEST_NAME not in {p.name for p in src.iterdir()}
