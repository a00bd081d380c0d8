"""The verified loader: copy a pinned model directory into `dest`, serving only bytes that match.

`load(source, digest, dest)` (and `slmfleet load`, the init container of a revision's pods):

1. **Cache.** If `dest/.slmfleet-verified` records this digest, every listed file is checked
   against the size and modification time recorded when it was verified (and, with `reverify`,
   hashed again), files the manifest does not list are removed, and that is all: the storage is
   not contacted, so restarts are quick and do not depend on it. A file that changed is not an
   error: the load goes on as below, and fetches only what differs.
2. **Manifest.** `slmfleet-manifest.json` beside the weights is read and its digest compared with
   the pin; a different digest (or a manifest that does not parse) fails at once with
   EXIT_DIGEST_MISMATCH, before any weight file is read. Without a stored manifest the source is
   listed (names and sizes; hashes need the bytes): a local directory is hashed in place, an S3
   prefix is downloaded and hashed into the staging directory, and only then is the digest of the
   manifest computed from that compared with the pin; nothing reaches its place unless it matches.
3. **Formats.** A manifest that lists a pickle file (`.bin .pt .pth .pkl .pickle .ckpt`) is
   refused (EXIT_REFUSED_FORMAT) unless `allow_pickle`.
4. **Files.** Each listed file already in `dest` with the right size is hashed and kept if it
   matches. The others are fetched in ranges (several in flight per file, `concurrency` in all),
   appended to `dest/.slmfleet-staging/<sha256>.part` and hashed as they arrive; a `.part` left by
   an interrupted run is resumed from its length (its bytes are hashed again to continue the
   running hash). A file moves into place (atomic rename, read-only) only when its size and hash
   match; otherwise EXIT_FILE_MISMATCH names the file, the expected and the actual hash. (A resumed
   file that does not match is fetched once more from the start before that verdict.) Files of
   identical content are fetched once. Files the source has but the manifest does not list are
   never read.
5. **Finish.** Files in `dest` that the manifest does not list are deleted, the staging directory
   goes, and the marker (digest, manifest, and each file's size and mtime) is written last.

`dest` must be empty, or hold the marker or staging directory of an earlier load, unless `force`
(adopting a directory: matching files are kept, everything else is deleted). `lost+found` at the
top is left alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmfleet.api.timestamps import rfc3339
from slmfleet.weights.errors import (
    EXIT_DIGEST_MISMATCH,
    EXIT_ERROR,
    EXIT_FILE_MISMATCH,
    EXIT_OK,
    EXIT_REFUSED_FORMAT,
    EXIT_SOURCE_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    DigestMismatch,
    FileMismatch,
    RefusedFormat,
    SourceError,
    Unreachable,
    UsageError,
    WeightsError,
)
from slmfleet.weights.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    STAGING_DIR,
    VERIFIED_MARKER,
    FileEntry,
    Manifest,
    ManifestError,
    default_workers,
    digest_of,
    hash_file,
    is_digest,
    manifest_of_directory,
    update_from_file,
)
from slmfleet.weights.progress import Progress, human_bytes, human_rate
from slmfleet.weights.transfer import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PART_SIZE,
    Aborted,
    Fetcher,
    LocalSource,
    RetryPolicy,
    Source,
    SourceMissing,
    SourceTooShort,
    open_source,
    storage_error,
)

__all__ = [
    "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_DIGEST_MISMATCH", "EXIT_FILE_MISMATCH",
    "EXIT_REFUSED_FORMAT", "EXIT_UNREACHABLE", "EXIT_SOURCE_ERROR",
    "WeightsError", "UsageError", "DigestMismatch", "FileMismatch", "RefusedFormat", "Unreachable", "SourceError",
    "PICKLE_SUFFIXES", "LoadOptions", "LoadResult", "load", "pickle_files", "write_termination_message",
    "TERMINATION_LOG",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TERMINATION_LOG = "/dev/termination-log"
MAX_TERMINATION_MESSAGE = 4096  # what the kubelet keeps
MARKER_VERSION = 1
KEEP_AT_TOP = frozenset({"lost+found"})


def pickle_files(paths: Iterable[str]) -> list[str]:
    return [p for p in paths if p.lower().endswith(PICKLE_SUFFIXES)]


@dataclass(frozen=True)
class LoadOptions:
    concurrency: int = DEFAULT_CONCURRENCY  # ranges in flight at once, over all files
    part_size: int = DEFAULT_PART_SIZE  # bytes per ranged GET
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    allow_pickle: bool = False
    reverify: bool = False  # on a cache hit, hash every file again (else sizes and mtimes)
    force: bool = False  # adopt a non-empty dest that no load wrote
    hash_workers: int | None = None  # files hashed at once when checking local copies (default: CPUs)
    progress: bool | None = None  # None: when stderr is a terminal


@dataclass(frozen=True)
class LoadResult:
    digest: str
    files: int
    total_bytes: int
    downloaded_bytes: int
    reused_files: int
    cache_hit: bool
    seconds: float
    removed: tuple[str, ...] = ()

    def summary(self) -> str:
        if self.cache_hit:
            return f"verified {self.digest}: cached copy ({self.files} files, {human_bytes(self.total_bytes)})"
        return (f"verified {self.digest}: {self.files} files, {human_bytes(self.total_bytes)} "
                f"({human_bytes(self.downloaded_bytes)} fetched, {self.reused_files} files already in place) "
                f"in {self.seconds:.1f} s")


def _stderr_log(message: str) -> None:
    print(f"slmfleet load: {message}", file=sys.stderr, flush=True)


def load(source: Source | str, digest: str, dest: str | os.PathLike[str], options: LoadOptions | None = None,
         *, log: Callable[[str], None] | None = None,
         client_factory: Callable[[], Any] | None = None) -> LoadResult:
    """Make `dest` hold exactly the files of the manifest pinned by `digest`, verified.
    Raises a WeightsError subclass (whose `exit_code` is the command's status) on any failure."""
    opts = options or LoadOptions()
    if not is_digest(digest):
        raise UsageError(f"digest {digest!r} is not sha256:<64 lowercase hex digits>")
    src = open_source(source, client_factory) if isinstance(source, str) else source
    loader = _Loader(src, digest, Path(dest), opts, _stderr_log if log is None else log)
    try:
        return loader.run()
    except WeightsError:
        raise
    except OSError as exc:  # the destination's file system: permissions, space
        raise WeightsError(f"{exc.filename or dest}: {exc.strerror or exc}") from exc


class _Loader:
    def __init__(self, source: Source, digest: str, dest: Path, opts: LoadOptions,
                 log: Callable[[str], None]) -> None:
        self.source, self.digest, self.dest, self.opts = source, digest, dest.absolute(), opts
        self._log = log
        self._log_lock = threading.Lock()
        self._bar: Progress | None = None
        self.staging = self.dest / STAGING_DIR
        self.downloaded = 0
        self.reused = 0
        self._count_lock = threading.Lock()
        self.t0 = time.monotonic()

    # --- logging ---------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        with self._log_lock:
            if self._bar is not None:
                self._bar.close()  # clear the status line; it is redrawn on the next update
            self._log(message)

    # --- the steps -------------------------------------------------------------------------------

    def run(self) -> LoadResult:
        self._prepare_dest()
        hit = self._cache_hit()
        if hit is not None:
            return hit
        (self.dest / VERIFIED_MARKER).unlink(missing_ok=True)
        self.staging.mkdir(exist_ok=True)
        raw = self._storage(self.source.read_manifest, f"reading {self.source.describe(MANIFEST_NAME)}")
        if raw is not None:
            manifest = self._verified_manifest(raw)
            self._refuse_pickle(f.path for f in manifest.files)
            self.log(f"manifest {self.source.describe(MANIFEST_NAME)} has the pinned digest: "
                     f"{len(manifest.files)} files, {human_bytes(manifest.total_size)}")
            self._materialize(manifest)
        else:
            manifest = self._without_manifest()
        removed = self._remove_unlisted(manifest)
        shutil.rmtree(self.staging, ignore_errors=True)
        self._write_marker(manifest)
        result = LoadResult(self.digest, len(manifest.files), manifest.total_size, self.downloaded,
                            self.reused, False, time.monotonic() - self.t0, tuple(removed))
        self.log(result.summary())
        return result

    def _prepare_dest(self) -> None:
        dest = self.dest
        real = Path(os.path.realpath(dest))
        if real == Path("/"):
            raise UsageError("--dest must not be the root directory")
        if isinstance(self.source, LocalSource):
            src = Path(os.path.realpath(self.source.root))
            if real == src or src in real.parents or real in src.parents:
                raise UsageError(f"--dest {dest} and the source {src} must not contain each other")
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UsageError(f"--dest {dest} exists and is not a directory") from None
        if not dest.is_dir():
            raise UsageError(f"--dest {dest} is not a directory")
        names = set(os.listdir(dest)) - KEEP_AT_TOP
        if names and not names & {VERIFIED_MARKER, STAGING_DIR} and not self.opts.force:
            raise UsageError(
                f"--dest {dest} is not empty and was not written by slmfleet load; pass --force to adopt it "
                "(files that match the manifest are kept, all others are deleted)")

    def _storage(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return self.opts.retry.call(fn, what=what, log=self.log)
        except (WeightsError, ManifestError):  # a listing no manifest could hold: the caller says why
            raise
        except Exception as exc:  # every storage failure becomes an exit code
            raise storage_error(exc, what, self.opts.retry.attempts) from exc

    def _verified_manifest(self, raw: bytes) -> Manifest:
        where = self.source.describe(MANIFEST_NAME)
        if len(raw) > MAX_MANIFEST_BYTES:  # read up to one byte past the limit: not all of it
            raise DigestMismatch(f"manifest digest mismatch: {where} is larger than {MAX_MANIFEST_BYTES} bytes, "
                                 f"more than a manifest may have; the pin is {self.digest}; nothing was downloaded")
        try:
            manifest = Manifest.parse(raw)
        except ManifestError as exc:
            raise DigestMismatch(f"manifest digest mismatch: {where} is not a valid manifest ({exc}); its bytes "
                                 f"hash to {digest_of(raw)}, the pin is {self.digest}; nothing was downloaded") from None
        if manifest.digest != self.digest:
            raise DigestMismatch(f"manifest digest mismatch: {where} has digest {manifest.digest}, the pin is "
                                 f"{self.digest}; nothing was downloaded")
        return manifest

    def _refuse_pickle(self, paths: Iterable[str]) -> None:
        found = pickle_files(paths)
        if found and not self.opts.allow_pickle:
            shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
            raise RefusedFormat(f"refusing pickle files (they can run code when loaded): {shown}; remove them from "
                                "the model directory before pinning, or allow pickle explicitly (--allow-pickle)")

    def _without_manifest(self) -> Manifest:
        where = self.source.describe()
        self.log(f"no {MANIFEST_NAME} at {where}: listing the source and hashing every file "
                 "before comparing with the pin")
        try:
            listing = self._storage(self.source.list_files, f"listing {where}")
        except ManifestError as exc:
            raise DigestMismatch(f"manifest digest mismatch: {where} cannot match the pin: {exc}") from None
        self._refuse_pickle(p for p, _ in listing)
        if isinstance(self.source, LocalSource):
            try:
                manifest = manifest_of_directory(self.source.root, workers=self.opts.hash_workers,
                                                 progress=self.opts.progress, label="hashing the source")
            except ManifestError as exc:
                raise DigestMismatch(f"manifest digest mismatch: {where} cannot match the pin: {exc}") from None
            self._check_computed(manifest, where)
            self._materialize(manifest)  # copies, hashing again while copying
            return manifest
        return self._download_unpinned(listing, where)

    def _check_computed(self, manifest: Manifest, where: str) -> None:
        if manifest.digest != self.digest:
            raise DigestMismatch(f"manifest digest mismatch: the {len(manifest.files)} files at {where} (no stored "
                                 f"manifest) have digest {manifest.digest}, the pin is {self.digest}")

    # --- files -----------------------------------------------------------------------------------

    def _materialize(self, manifest: Manifest) -> None:
        groups: dict[tuple[str, int], list[FileEntry]] = {}
        for entry in manifest.files:
            groups.setdefault((entry.sha256, entry.size), []).append(entry)
        # Biggest first: the long downloads start at once, the small files fill in around them.
        ordered = sorted(groups.values(), key=lambda g: -g[0].size)
        with Progress("loading", manifest.total_size, enabled=self.opts.progress) as bar, \
                Fetcher(self.source, concurrency=self.opts.concurrency, part_size=self.opts.part_size,
                        retry=self.opts.retry, log=self.log) as fetcher:
            self._bar = bar
            try:
                self._run_all(ordered, lambda group: self._materialize_group(group, fetcher, bar), fetcher)
            finally:
                self._bar = None

    def _run_all(self, items: list[Any], fn: Callable[[Any], Any], fetcher: Fetcher) -> list[Any]:
        workers = max(1, min(self.opts.concurrency, len(items)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="file") as pool:
            futures = [pool.submit(fn, item) for item in items]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [e for e in (f.exception() for f in done) if e is not None]
            if errors:
                fetcher.abort.set()
                wait(futures)
                errors = [e for e in (f.exception() for f in futures) if e is not None]
                real = [e for e in errors if not isinstance(e, Aborted)]
                raise (real or errors)[0]
            return [f.result() for f in futures]

    def _materialize_group(self, group: list[FileEntry], fetcher: Fetcher, bar: Progress) -> None:
        have: FileEntry | None = None
        first: FileEntry | None
        missing: list[FileEntry] = []
        for entry in group:
            if self._in_place(entry, bar):
                have = have or entry
                with self._count_lock:
                    self.reused += 1
                self.log(f"verified {entry.path} ({human_bytes(entry.size)}, already in place)")
            else:
                missing.append(entry)
        if not missing:
            return
        if have is None and group[0].size == 0:
            first = missing.pop(0)
            tmp = self.staging / f"empty-{uuid.uuid4().hex}"
            tmp.write_bytes(b"")
            _fsync(tmp)
            self._place(tmp, first.path)
            self.log(f"created {first.path} (empty)")
            have = first
        if have is None:
            first = missing.pop(0)
            part = self._download(first, fetcher, bar)
            copy_from = part
        else:
            first, part = None, None
            copy_from = self.dest / have.path
        for entry in missing:
            tmp = self.staging / f"{entry.sha256}.copy-{uuid.uuid4().hex}"
            shutil.copyfile(copy_from, tmp)
            _fsync(tmp)
            self._place(tmp, entry.path)
            bar.add(entry.size)
            self.log(f"copied {entry.path} ({human_bytes(entry.size)}, same content as "
                     f"{(first or have).path})")  # type: ignore[union-attr]
        if part is not None and first is not None:
            self._place(part, first.path)

    def _in_place(self, entry: FileEntry, bar: Progress | None) -> bool:
        path = self._clean_file(entry.path)
        if path is None or path.stat().st_size != entry.size:
            return False
        size, hexdigest = hash_file(path, progress=bar)
        return size == entry.size and hexdigest == entry.sha256

    def _clean_file(self, rel: str) -> Path | None:
        """dest/rel if it is a regular file reached through real directories (no links), else None."""
        cur = self.dest
        parts = rel.split("/")
        try:
            for part in parts[:-1]:
                cur = cur / part
                if not stat.S_ISDIR(os.lstat(cur).st_mode):
                    return None
            cur = cur / parts[-1]
            return cur if stat.S_ISREG(os.lstat(cur).st_mode) else None
        except FileNotFoundError:
            return None

    def _download(self, entry: FileEntry, fetcher: Fetcher, bar: Progress) -> Path:
        part = self.staging / f"{entry.sha256}.part"
        for attempt in (1, 2):
            start, actual = self._fetch_to_part(entry.path, entry.size, part, fetcher, bar,
                                                where=self.source.describe(entry.path), expected=entry)
            if actual == entry.sha256:
                return part
            part.unlink(missing_ok=True)
            if start > 0 and attempt == 1:
                self.log(f"{entry.path}: the resumed download does not match; fetching it again from the start")
                continue
            raise FileMismatch(entry.path, f"sha256:{entry.sha256}", f"sha256:{actual}",
                               where=self.source.describe(entry.path))
        raise AssertionError("unreachable")  # pragma: no cover

    def _fetch_to_part(self, path: str, size: int, part: Path, fetcher: Fetcher, bar: Progress, *,
                       where: str, expected: FileEntry | None) -> tuple[int, str]:
        """Fetch `path` into `part`, resuming from what `part` holds; (resumed from, hex sha256)."""
        h = hashlib.sha256()
        start = 0
        try:
            st = os.lstat(part)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISREG(st.st_mode) or st.st_size > size:
                _remove(part)
            elif st.st_size:
                start = update_from_file(h, part, limit=st.st_size)
                bar.add(start)
                self.log(f"resuming {path} at {human_bytes(start)} of {human_bytes(size)}")
        t0 = time.monotonic()
        expect = f"sha256:{expected.sha256} ({size} bytes)" if expected else f"{size} bytes"
        gen = fetcher.stream(path, start, size)
        try:
            with open(part, "ab") as f:
                while True:
                    try:
                        chunk = next(gen)
                    except StopIteration:
                        break
                    except SourceMissing:
                        raise FileMismatch(path, expect, "no such file in the source", where=where) from None
                    except SourceTooShort as exc:
                        got = f"{exc.actual} bytes" if exc.actual is not None else "fewer bytes"
                        raise FileMismatch(path, expect, f"a shorter file ({got})", where=where) from None
                    except (Aborted, WeightsError):
                        raise
                    except Exception as exc:  # storage errors after the retries
                        raise storage_error(exc, f"downloading {where}", self.opts.retry.attempts) from exc
                    f.write(chunk)
                    h.update(chunk)
                    bar.add(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        finally:
            gen.close()
            if size and part.exists() and part.stat().st_size == 0:
                part.unlink()  # nothing arrived: no .part to resume
        fetched = size - start
        with self._count_lock:
            self.downloaded += fetched
        seconds = time.monotonic() - t0
        resumed = f", resumed at {human_bytes(start)}" if start else ""
        verb = "copied" if isinstance(self.source, LocalSource) else "downloaded"
        self.log(f"{verb} {path} ({human_bytes(fetched)} in {seconds:.1f} s, "
                 f"{human_rate(fetched, seconds)}{resumed})")
        return start, h.hexdigest()

    def _download_unpinned(self, listing: list[tuple[str, int]], where: str) -> Manifest:
        total = sum(size for _, size in listing)
        parts = {path: self.staging / f"unpinned-{hashlib.sha256(path.encode()).hexdigest()[:32]}.part"
                 for path, _ in listing}
        with Progress("loading", total, enabled=self.opts.progress) as bar, \
                Fetcher(self.source, concurrency=self.opts.concurrency, part_size=self.opts.part_size,
                        retry=self.opts.retry, log=self.log) as fetcher:
            self._bar = bar
            try:
                hashes = self._run_all(
                    sorted(listing, key=lambda item: -item[1]),
                    lambda item: (item[0], item[1], self._fetch_to_part(
                        item[0], item[1], parts[item[0]], fetcher, bar,
                        where=self.source.describe(item[0]), expected=None)[1]),
                    fetcher)
            finally:
                self._bar = None
        manifest = Manifest.of(FileEntry(path, size, hexdigest) for path, size, hexdigest in hashes)
        if manifest.digest != self.digest:
            for part in parts.values():
                part.unlink(missing_ok=True)
        self._check_computed(manifest, where)
        for entry in manifest.files:
            self._place(parts[entry.path], entry.path)
        return manifest

    def _place(self, tmp: Path, rel: str) -> None:
        """Atomically move a verified file into place, read-only."""
        cur = self.dest
        for part in rel.split("/")[:-1]:
            cur = cur / part
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur)
                continue
            if not stat.S_ISDIR(st.st_mode):  # a file or a link where the manifest has a directory
                os.unlink(cur)
                os.mkdir(cur)
        target = self.dest / rel
        try:
            st = os.lstat(target)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(target)
        except FileNotFoundError:
            pass
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)

    # --- cache, cleanup and the marker -------------------------------------------------------

    def _cache_hit(self) -> LoadResult | None:
        marker = self.dest / VERIFIED_MARKER
        try:
            obj = json.loads(marker.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.log(f"ignoring an unreadable {VERIFIED_MARKER}: {exc}")
            return None
        try:
            if obj["version"] != MARKER_VERSION:
                raise ValueError(f"version {obj['version']!r}")
            recorded = obj["digest"]
            manifest = Manifest.from_json(obj["manifest"])
            stats = {p: (int(v["size"]), int(v["mtimeNs"])) for p, v in obj["files"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.log(f"ignoring an unreadable {VERIFIED_MARKER}: {exc}")
            return None
        if recorded != self.digest or manifest.digest != self.digest:
            self.log(f"{self.dest} holds {recorded}; loading {self.digest}")
            return None
        self._refuse_pickle(f.path for f in manifest.files)
        for entry in manifest.files:
            path = self._clean_file(entry.path)
            if path is None:
                self.log(f"cached copy: {entry.path} is missing; checking the others and fetching what differs")
                return None
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) != stats.get(entry.path) or st.st_size != entry.size:
                self.log(f"cached copy: {entry.path} changed since it was verified; checking it again")
                return None
        if self.opts.reverify:
            bad = self._rehash_all(manifest)
            if bad:
                self.log(f"cached copy: {', '.join(bad[:10])} no longer match the manifest; fetching them again")
                return None
        removed = self._remove_unlisted(manifest)
        shutil.rmtree(self.staging, ignore_errors=True)
        how = "re-hashed every file" if self.opts.reverify else "checked sizes and modification times"
        result = LoadResult(self.digest, len(manifest.files), manifest.total_size, 0, len(manifest.files), True,
                            time.monotonic() - self.t0, tuple(removed))
        self.log(f"cache hit: {self.dest} already holds {self.digest} ({len(manifest.files)} files, "
                 f"{human_bytes(manifest.total_size)}; {how})")
        return result

    def _rehash_all(self, manifest: Manifest) -> list[str]:
        def check(entry: FileEntry) -> str | None:
            return None if hash_file(self.dest / entry.path, progress=bar)[1] == entry.sha256 else entry.path

        with Progress("re-verifying", manifest.total_size, enabled=self.opts.progress) as bar:
            workers = self.opts.hash_workers or default_workers()
            with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hash") as pool:
                return [p for p in pool.map(check, manifest.files) if p is not None]

    def _remove_unlisted(self, manifest: Manifest) -> list[str]:
        listed = manifest.by_path
        removed: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.dest, topdown=True):
            rel_dir = os.path.relpath(dirpath, self.dest)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            if not rel_dir:
                dirnames[:] = [d for d in dirnames if d not in KEEP_AT_TOP and d != STAGING_DIR]
                filenames = [f for f in filenames if f != VERIFIED_MARKER]
            for name in list(dirnames):
                full = os.path.join(dirpath, name)
                if os.path.islink(full):  # a link to a directory: never followed, never served
                    os.unlink(full)
                    removed.append(rel_dir + name)
                    dirnames.remove(name)
            for name in filenames:
                if rel_dir + name not in listed:
                    os.unlink(os.path.join(dirpath, name))
                    removed.append(rel_dir + name)
        for dirpath, _dirnames, _files in os.walk(self.dest, topdown=False):
            if Path(dirpath) != self.dest and not os.listdir(dirpath):
                rel = os.path.relpath(dirpath, self.dest)
                if rel.split(os.sep)[0] not in KEEP_AT_TOP | {STAGING_DIR}:
                    os.rmdir(dirpath)
        if removed:
            shown = ", ".join(removed[:10]) + (f" and {len(removed) - 10} more" if len(removed) > 10 else "")
            self.log(f"removed {len(removed)} files not in the manifest: {shown}")
        return removed

    def _write_marker(self, manifest: Manifest) -> None:
        files = {}
        for entry in manifest.files:
            st = os.stat(self.dest / entry.path)
            files[entry.path] = {"size": st.st_size, "mtimeNs": st.st_mtime_ns}
        obj = {"version": MARKER_VERSION, "digest": self.digest, "manifest": manifest.to_json(), "files": files,
               "verifiedAt": rfc3339(dt.datetime.now(dt.UTC))}
        tmp = self.dest / f"{VERIFIED_MARKER}.tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, sort_keys=True, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dest / VERIFIED_MARKER)
        _fsync_dir(self.dest)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # pragma: no cover - some file systems cannot fsync a directory
        pass


def write_termination_message(message: str, path: str | None = None) -> bool:
    """Write `message` (cut to the 4096 bytes the kubelet keeps) where Kubernetes reads a container's
    termination message. Without `path`: /dev/termination-log, if it exists and is writable.
    Never raises; says whether it wrote."""
    if path is None:
        path = TERMINATION_LOG
        if not (os.path.exists(path) and os.access(path, os.W_OK)):
            return False
    data = message.encode("utf-8")[:MAX_TERMINATION_MESSAGE].decode("utf-8", "ignore").encode("utf-8")
    try:
        with open(path, "wb") as f:
            f.write(data)
        return True
    except OSError:
        return False
