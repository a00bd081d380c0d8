"""Weight manifests: every file of a model directory as `{path, size, sha256}`, and the digest that pins them.

Format (version 1). A manifest is a JSON object with the files, sorted by path, and a format
version, serialised canonically (keys sorted, no whitespace, UTF-8, no trailing newline):

    {"files":[{"path":"config.json","sha256":"<64 hex>","size":685},
              {"path":"model.safetensors","sha256":"<64 hex>","size":988097824}],"version":1}

- `path` is relative to the model directory, with `/` separators; no empty, `.` or `..`
  segment, no leading `/`, no backslash or NUL. Paths sort by Unicode code point (the same order
  as their UTF-8 bytes) and appear once.
- `size` is the file's length in bytes, `sha256` the lowercase hex SHA-256 of its content.
- The digest is `sha256:` + the hex SHA-256 of the canonical bytes, so it does not depend on where
  the files are (a local directory, an S3 prefix, a volume) and `sha256sum slmfleet-manifest.json`
  prints the same hash. The version is inside the hashed bytes: a loader never reads a manifest
  of a format it does not know as if it were this one.
- Names reserved by slmfleet at the top of a model directory are never listed and are refused
  when parsing: the manifest itself (`slmfleet-manifest.json`, stored beside the weights) and the
  loader's marker and staging directory (`.slmfleet-verified`, `.slmfleet-staging`), so pinning a
  directory the loader filled gives the digest it was loaded with.
- Everything else is listed, hidden files included; symbolic links are followed (a Hugging Face
  snapshot is a directory of links into its blob store) and empty directories are not recorded.

Limits (a manifest is read from storage the tenant controls, by the operator and by the loader):
at most `MAX_MANIFEST_FILES` (10,000) files, paths of at most `MAX_PATH_BYTES` (1,024, S3's own
key limit) UTF-8 bytes, and at most `MAX_MANIFEST_BYTES` (16 MiB) in all, which holds 10,000
entries with paths of the full length. A model directory has tens of files, a large sharded one a
few hundred. The bytes are read with that cap whatever the storage says about their length, and
the JSON is counted (objects, arrays, members; a C-speed scan of the bytes) before it is parsed,
so a text that would expand into millions of Python objects is refused without building them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from slmfleet.weights.progress import Progress

MANIFEST_NAME = "slmfleet-manifest.json"
VERIFIED_MARKER = ".slmfleet-verified"
STAGING_DIR = ".slmfleet-staging"
RESERVED_NAMES = frozenset({MANIFEST_NAME, VERIFIED_MARKER, STAGING_DIR})
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_MANIFEST_FILES = 10_000
MAX_PATH_BYTES = 1024
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """Not a valid manifest (or a directory that cannot be described by one)."""


def is_digest(text: str) -> bool:
    return isinstance(text, str) and DIGEST_RE.match(text) is not None


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _shown(value: Any, limit: int = 100) -> str:
    """repr(value), cut to `limit` characters: values from a manifest are quoted in errors, and
    errors reach status and Events."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_path(path: Any) -> str:
    """`path` if it is a safe relative POSIX path inside a model directory, else ManifestError."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"file path {_shown(path)} is not a non-empty string")
    if "\\" in path or "\x00" in path:
        raise ManifestError(f"file path {_shown(path)} contains a backslash or NUL")
    if path.startswith("/"):
        raise ManifestError(f"file path {_shown(path)} is absolute")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ManifestError(f"file path {_shown(path)} has an empty, '.' or '..' segment")
    if parts[0] in RESERVED_NAMES:
        raise ManifestError(f"file path {_shown(path)} is a name reserved by slmfleet")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ManifestError(f"file path {_shown(path)} is not valid UTF-8") from exc
    if len(encoded) > MAX_PATH_BYTES:
        raise ManifestError(f"file path {_shown(path)} is longer than {MAX_PATH_BYTES} bytes")
    return path


@dataclass(frozen=True, order=True)
class FileEntry:
    path: str
    size: int
    sha256: str  # lowercase hex, without the "sha256:" prefix

    def __post_init__(self) -> None:
        validate_path(self.path)
        if type(self.size) is not int or self.size < 0:
            raise ManifestError(f"{_shown(self.path)}: size {_shown(self.size)} is not a non-negative integer")
        if not isinstance(self.sha256, str) or not _HEX_RE.match(self.sha256):
            raise ManifestError(f"{_shown(self.path)}: sha256 {_shown(self.sha256)} is not 64 lowercase hex digits")

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]

    @classmethod
    def of(cls, entries: Iterable[FileEntry]) -> Manifest:
        files = tuple(sorted(entries, key=lambda e: e.path))
        for a, b in itertools.pairwise(files):
            if a.path == b.path:
                raise ManifestError(f"file path {_shown(a.path)} is listed twice")
        return cls(files)

    def __post_init__(self) -> None:
        if len(self.files) > MAX_MANIFEST_FILES:
            raise ManifestError(f"{len(self.files)} files, more than the {MAX_MANIFEST_FILES} a manifest may list")
        paths = [f.path for f in self.files]
        if paths != sorted(set(paths)):
            raise ManifestError("files must be sorted by path and unique (use Manifest.of)")
        # A path may not also be a directory of another path ("a" and "a/b").
        names = set(paths)
        for p in paths:
            head = p
            while "/" in head:
                head = head.rsplit("/", 1)[0]
                if head in names:
                    raise ManifestError(f"{_shown(head)} is listed as a file and as the directory of {_shown(p)}")
        if len(self.canonical_bytes) > MAX_MANIFEST_BYTES:  # only paths full of escaped characters get here
            raise ManifestError(f"the manifest would be larger than {MAX_MANIFEST_BYTES} bytes")

    def to_json(self) -> dict[str, Any]:
        return {"files": [f.to_json() for f in self.files], "version": MANIFEST_VERSION}

    @cached_property
    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @cached_property
    def digest(self) -> str:
        return digest_of(self.canonical_bytes)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @cached_property
    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        if not isinstance(obj, Mapping):
            raise ManifestError("a manifest is a JSON object")
        if set(obj) != {"files", "version"}:
            raise ManifestError(f"a manifest has exactly the keys files and version, not {_shown(sorted(obj))}")
        if obj["version"] != MANIFEST_VERSION or type(obj["version"]) is not int:
            raise ManifestError(f"manifest version {_shown(obj['version'])} is not {MANIFEST_VERSION}")
        files = obj["files"]
        if not isinstance(files, list):
            raise ManifestError("files is not a list")
        if len(files) > MAX_MANIFEST_FILES:
            raise ManifestError(f"{len(files)} files, more than the {MAX_MANIFEST_FILES} a manifest may list")
        entries = []
        for item in files:
            if not isinstance(item, Mapping) or set(item) != {"path", "size", "sha256"}:
                raise ManifestError(f"file entry {_shown(item)} does not have exactly path, size and sha256")
            entries.append(FileEntry(path=item["path"], size=item["size"], sha256=item["sha256"]))
        return cls.of(entries)

    @classmethod
    def parse(cls, data: bytes | str) -> Manifest:
        """Parse (strictly: duplicate keys, unknown keys and unsafe paths are refused), within the
        limits: the size first, then the JSON's shape, counted before anything is built."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        # Per file one object and three members (3 ':' and 3 ','); around them an object and an
        # array. Anything much bigger is refused before it is parsed.
        if not json_within(raw, objects=MAX_MANIFEST_FILES + 1, arrays=16, items=6 * MAX_MANIFEST_FILES + 16):
            raise ManifestError(f"manifest has more JSON values than {MAX_MANIFEST_FILES} files need "
                                "(too many files, or not a manifest)")
        try:
            obj = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
        except ManifestError:  # a duplicate key
            raise
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, too deep, an int of 5,000 digits
            raise ManifestError(f"manifest is not JSON: {exc}") from exc
        return cls.from_json(obj)


_JSON_STRING = re.compile(rb'"[^"]*+"')


def _without_escapes(data: bytes) -> bytes:
    """The text with `\\\\` and `\\"` removed, so every `"` left opens or closes a string (in valid
    JSON; in invalid JSON the views part only where the parser fails anyway)."""
    return data.replace(b"\\\\", b"").replace(b'\\"', b"")


def json_counts(data: bytes) -> tuple[int, int, int]:
    """(objects, arrays, members and elements) of a JSON text, counted on its bytes without
    parsing it: the `{`, the `[`, and the `,` and `:` outside strings (the first element of an array
    follows its `[`, which the arrays count). Exact for valid JSON; bytes only, C speed."""
    if b'"' in data:
        data = _JSON_STRING.sub(b"", _without_escapes(data))
    return data.count(b"{"), data.count(b"["), data.count(b",") + data.count(b":")


def json_within(data: bytes, *, objects: int, arrays: int, items: int) -> bool:
    """Whether a JSON text has at most this many objects, arrays and members or elements (see
    `json_counts`), and so at most `1 + objects + arrays + 2 * items` strings: every key and every
    value follows a `{`, `[`, `,` or `:`, or is the whole text. Counts bytes, parses nothing; the
    strings are counted first so that stepping over them costs little."""
    def fits(counts: tuple[int, int, int]) -> bool:
        return counts[0] <= objects and counts[1] <= arrays and counts[2] <= items
    if fits((data.count(b"{"), data.count(b"["), data.count(b",") + data.count(b":"))):
        return True  # an upper bound, with the strings' bytes in: usually enough
    if _without_escapes(data).count(b'"') > 2 * (1 + objects + arrays + 2 * items):
        return False
    return fits(json_counts(data))


def reject_duplicate_keys(error: Callable[[str], Exception]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A json `object_pairs_hook` that raises `error(message)` on a repeated key: a JSON object
    with one key twice means two readers may see two different values."""
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise error(f"duplicate key {_shown(k)}")
            out[k] = v
        return out
    return hook


_no_duplicate_keys = reject_duplicate_keys(ManifestError)


# --- hashing -------------------------------------------------------------------------------------


def update_from_file(h: Any, path: str | os.PathLike[str], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     progress: Progress | None = None, limit: int | None = None) -> int:
    """Feed a file (its first `limit` bytes, if given) to the hash object `h`, through one reusable
    buffer; the read and the hash both release the GIL, so files hash in parallel on threads.
    Returns the number of bytes read."""
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):  # pragma: no cover - not every platform or file system
            pass
        while limit is None or size < limit:
            want = chunk_size if limit is None else min(chunk_size, limit - size)
            n = f.readinto(view[:want])
            if not n:
                break
            h.update(view[:n])
            size += n
            if progress is not None:
                progress.add(n)
    return size


def hash_file(path: str | os.PathLike[str], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
              progress: Progress | None = None) -> tuple[int, str]:
    """(size, hex SHA-256) of a file, streamed in `chunk_size` reads."""
    h = hashlib.sha256()
    size = update_from_file(h, path, chunk_size=chunk_size, progress=progress)
    return size, h.hexdigest()


def list_directory(root: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """Every regular file under `root` as (manifest path, file path), following symbolic links,
    without the names reserved at the top. Raises ManifestError for a path a manifest cannot
    hold, a link loop, or something that is neither a file nor a directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    out: list[tuple[str, Path]] = []
    seen_dirs: set[tuple[int, int]] = set()

    def walk(directory: Path, rel: str) -> None:
        st = directory.stat()
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            raise ManifestError(f"{directory} is reached twice (a symbolic link loop?)")
        seen_dirs.add(key)
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            name = e.name
            child_rel = f"{rel}{name}"
            if not rel and name in RESERVED_NAMES:
                continue
            try:
                st_child = os.stat(e.path)  # follows links
            except FileNotFoundError as exc:
                raise ManifestError(f"{e.path} is a dangling symbolic link") from exc
            if stat.S_ISDIR(st_child.st_mode):
                walk(Path(e.path), child_rel + "/")
            elif stat.S_ISREG(st_child.st_mode):
                out.append((validate_path(child_rel), Path(e.path)))
                if len(out) > MAX_MANIFEST_FILES:
                    raise ManifestError(f"{root} has more than the {MAX_MANIFEST_FILES} files a manifest may list")
            else:
                raise ManifestError(f"{e.path} is neither a regular file nor a directory")

    walk(root, "")
    return out


def default_workers() -> int:
    return max(1, min(32, os.cpu_count() or 1))


def manifest_of_directory(root: str | os.PathLike[str], *, workers: int | None = None,
                          chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool | None = None,
                          label: str = "hashing") -> Manifest:
    """Hash every file of a directory, `workers` files at a time (default: one per CPU)."""
    files = list_directory(root)
    sizes = {rel: p.stat().st_size for rel, p in files}
    # Largest first, so one big file does not start last and leave the other workers idle.
    files.sort(key=lambda item: -sizes[item[0]])
    with Progress(label, sum(sizes.values()), enabled=progress) as bar:
        def one(item: tuple[str, Path]) -> FileEntry:
            rel, path = item
            size, hexdigest = hash_file(path, chunk_size=chunk_size, progress=bar)
            return FileEntry(rel, size, hexdigest)

        n = max(1, workers or default_workers())
        if n == 1 or len(files) <= 1:
            entries = [one(item) for item in files]
        else:
            with ThreadPoolExecutor(max_workers=min(n, len(files)), thread_name_prefix="hash") as pool:
                entries = list(pool.map(one, files))
    return Manifest.of(entries)
