"""Where weights come from (a local directory or an S3 prefix), retries, and ordered ranged reads.

A file is read as consecutive ranges of `part_size` bytes. Up to `window` ranges of one file are
in flight at once on a shared thread pool (so one large file still downloads over several
connections), but they are handed to the consumer strictly in order: the consumer appends them to
a `.part` file and feeds the same bytes to SHA-256, so hashing happens while the data streams and
the bytes already written are always a prefix of the file (what a resume starts from).
Each range is retried on its own (tenacity, exponential backoff with jitter, bounded attempts);
a range that keeps failing fails the file.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, SSLError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from slmfleet.weights import s3
from slmfleet.weights.errors import SourceError, Unreachable, UsageError, WeightsError
from slmfleet.weights.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_FILES,
    RESERVED_NAMES,
    ManifestError,
    validate_path,
)

T = TypeVar("T")

DEFAULT_PART_SIZE = 8 * 1024 * 1024
DEFAULT_CONCURRENCY = 8


class SourceMissing(Exception):
    """The source has no file at this path."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} is missing from the source")
        self.path = path


class SourceTooShort(Exception):
    """The source's file ends before the expected size."""

    def __init__(self, path: str, actual: int | None) -> None:
        super().__init__(f"{path} is shorter in the source{f' ({actual} bytes)' if actual is not None else ''}")
        self.path, self.actual = path, actual


class ShortRead(ConnectionError):
    """A response ended early (a dropped connection): retryable."""


class Aborted(Exception):
    """Another file failed; this one stops too."""


def is_retryable(exc: BaseException) -> bool:
    return s3.is_retryable(exc)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded attempts with exponential backoff and jitter, for throttling, 5xx, resets, timeouts."""

    attempts: int = 5
    initial_wait: float = 0.5
    max_wait: float = 20.0

    def call(self, fn: Callable[..., T], *args: Any, what: str = "",
             log: Callable[[str], None] | None = None) -> T:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            if log is not None and exc is not None:
                wait = state.next_action.sleep if state.next_action else 0.0
                log(f"retrying {what}: {s3.describe_error(exc)} "
                    f"(attempt {state.attempt_number} of {self.attempts} failed; waiting {wait:.1f} s)")

        retrying = Retrying(
            stop=stop_after_attempt(max(1, self.attempts)),
            wait=wait_exponential_jitter(multiplier=self.initial_wait, max=self.max_wait, jitter=self.initial_wait),
            retry=retry_if_exception(is_retryable),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(fn, *args)


def storage_error(exc: BaseException, what: str, attempts: int) -> WeightsError:
    """The loader's error for a storage exception that survived the retries."""
    if isinstance(exc, WeightsError):
        return exc
    if is_retryable(exc):
        return Unreachable(f"{what}: {s3.describe_error(exc)} (gave up after {attempts} attempts)")
    if isinstance(exc, SSLError):
        return Unreachable(f"{what}: {s3.describe_error(exc)} (check the CA bundle)")
    if s3.is_credentials_error(exc):
        return SourceError(f"{what}: {s3.describe_error(exc)} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, s3.ReadLimitExceeded):
        return SourceError(f"{what}: {exc}")
    if isinstance(exc, (ClientError, BotoCoreError, PermissionError, FileNotFoundError, NotADirectoryError)):
        return SourceError(f"{what}: {s3.describe_error(exc)}")
    if isinstance(exc, OSError):
        return SourceError(f"{what}: {exc}")
    return WeightsError(f"{what}: {s3.describe_error(exc)}")


class Source(Protocol):
    def describe(self, path: str = "") -> str: ...

    def read_manifest(self) -> bytes | None:
        """The bytes of `slmfleet-manifest.json` beside the weights, or None if there is none."""

    def list_files(self) -> list[tuple[str, int]]:
        """(path, size) of every file, without the reserved names; paths validated."""

    def get_range(self, path: str, start: int, length: int) -> bytes:
        """Exactly `length` bytes from `start`; SourceMissing, SourceTooShort, or a storage error."""


class LocalSource:
    """A directory: a mounted volume, or a local copy (`/path` or `file:///path`)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def describe(self, path: str = "") -> str:
        return str(self.root / path) if path else f"{self.root}/"

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(self.root))

    def read_manifest(self) -> bytes | None:
        self._check_root()
        path = self.root / MANIFEST_NAME
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            return None
        return data

    def list_files(self) -> list[tuple[str, int]]:
        from slmfleet.weights.manifest import list_directory

        self._check_root()
        return [(rel, p.stat().st_size) for rel, p in list_directory(self.root)]

    def get_range(self, path: str, start: int, length: int) -> bytes:
        try:
            fd = os.open(self.root / path, os.O_RDONLY)
        except FileNotFoundError:
            raise SourceMissing(path) from None
        try:
            chunks = []
            got = 0
            while got < length:
                data = os.pread(fd, length - got, start + got)
                if not data:
                    raise SourceTooShort(path, os.fstat(fd).st_size)
                chunks.append(data)
                got += len(data)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        finally:
            os.close(fd)


class S3Source:
    def __init__(self, client: Any, location: s3.S3Location) -> None:
        self.client, self.location = client, location

    def describe(self, path: str = "") -> str:
        return self.location.uri(path)

    def read_manifest(self) -> bytes | None:
        try:
            resp = self.client.get_object(Bucket=self.location.bucket, Key=self.location.key(MANIFEST_NAME))
        except ClientError as exc:
            if s3.is_not_found(exc):
                return None
            raise
        body = resp["Body"]
        try:
            # At most one byte past the limit, whatever Content-Length says: the manifest's parser
            # refuses a larger one (as it does for LocalSource).
            data = s3.read_upto(body, MAX_MANIFEST_BYTES + 1)
        finally:
            body.close()
        expected = resp.get("ContentLength")
        if expected is not None and len(data) < min(int(expected), MAX_MANIFEST_BYTES + 1):
            raise ShortRead(f"{self.describe(MANIFEST_NAME)}: got {len(data)} of {expected} bytes")
        return data

    def list_files(self) -> list[tuple[str, int]]:
        out = []
        for rel, size in s3.list_objects(self.client, self.location):
            if rel in RESERVED_NAMES:
                continue
            out.append((validate_path(rel), size))
            if len(out) > MAX_MANIFEST_FILES:  # stop listing: a manifest could not hold them
                raise ManifestError(f"{self.describe()} has more than the {MAX_MANIFEST_FILES} files "
                                    "a manifest may list")
        return out

    def get_range(self, path: str, start: int, length: int) -> bytes:
        key = self.location.key(path)
        try:
            resp = self.client.get_object(Bucket=self.location.bucket, Key=key,
                                          Range=f"bytes={start}-{start + length - 1}")
        except ClientError as exc:
            if s3.is_not_found(exc):
                raise SourceMissing(path) from None
            if s3.error_code(exc) == "InvalidRange" or s3.http_status(exc) == 416:
                raise SourceTooShort(path, None) from None
            raise
        total = s3.content_range_total(resp.get("ContentRange"))
        if total is None and resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200:
            size = resp.get("ContentLength")  # the store ignored the Range: this is the whole object
            total = size if isinstance(size, int) else None
        if total is not None and total < start + length:
            resp["Body"].close()
            raise SourceTooShort(path, total)
        # Never more than the range, even from a store that ignores Range and sends everything.
        data = s3.range_body(resp, start, length, self.describe(path))
        if len(data) != length:
            raise ShortRead(f"{self.describe(path)}: got {len(data)} of {length} bytes at {start}")
        return data


def open_source(uri: str, client_factory: Callable[[], Any] | None = None) -> Source:
    """`s3://bucket/prefix/`, `file:///dir` or a directory path. `pvc://` is for the operator, which
    mounts the claim and passes its path here."""
    if uri.startswith("s3://"):
        try:
            location = s3.S3Location.parse(uri)
        except s3.S3UriError as exc:
            raise UsageError(str(exc)) from exc
        try:
            # One attempt per request in botocore: the retries are ours, bounded by RetryPolicy alone.
            client = client_factory() if client_factory else s3.client_from_env(
                {"max_attempts": 1, "max_pool_connections": 64})
        except ValueError as exc:
            raise UsageError(f"S3 settings: {exc}") from exc
        return S3Source(client, location)
    if uri.startswith("file://"):
        rest = uri.removeprefix("file://")
        host, sep, path = rest.partition("/")
        if host not in ("", "localhost") or not sep:
            raise UsageError(f"{uri!r}: expected file:///absolute/path")
        return LocalSource("/" + path)
    if "://" in uri:
        raise UsageError(f"{uri!r}: the loader reads s3://bucket/prefix/, file:///path or a directory "
                         "(mount a pvc:// claim and pass its path)")
    if not uri:
        raise UsageError("empty source")
    return LocalSource(uri)


class Fetcher:
    """Ranged reads of many files over one pool of `concurrency` threads, with at most
    `2 × concurrency` ranges (of `part_size` bytes) buffered in memory at a time."""

    def __init__(self, source: Source, *, concurrency: int = DEFAULT_CONCURRENCY,
                 part_size: int = DEFAULT_PART_SIZE, retry: RetryPolicy | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.source = source
        self.concurrency = max(1, concurrency)
        self.part_size = max(64 * 1024, part_size)
        self.retry = retry or RetryPolicy()
        self.log = log
        self.abort = threading.Event()
        self._slots = threading.BoundedSemaphore(2 * self.concurrency)
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="fetch")

    def close(self) -> None:
        self.abort.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, start: int, length: int) -> bytes:
        if self.abort.is_set():
            raise Aborted()
        what = f"GET {self.source.describe(path)} bytes {start}-{start + length - 1}"
        return self.retry.call(self.source.get_range, path, start, length, what=what, log=self.log)

    def stream(self, path: str, start: int, end: int) -> Generator[bytes, None, None]:
        """The bytes [start, end) of a file, in order, as chunks of at most part_size."""
        pending: deque[Future[bytes]] = deque()
        offset = start
        try:
            while offset < end or pending:
                if self.abort.is_set():
                    raise Aborted()
                while offset < end and len(pending) < self.concurrency:
                    # Block for a slot only when nothing of this file is in flight (so it progresses);
                    # otherwise take one if free and consume what is there.
                    if pending:
                        if not self._slots.acquire(blocking=False):
                            break
                    else:
                        self._acquire_or_abort()
                    n = min(self.part_size, end - offset)
                    try:
                        pending.append(self._pool.submit(self._get, path, offset, n))
                    except RuntimeError:  # the pool was shut down: we are aborting
                        self._slots.release()
                        raise Aborted() from None
                    offset += n
                fut = pending.popleft()
                try:
                    data = fut.result()
                finally:
                    self._slots.release()
                yield data
        finally:
            for fut in pending:
                fut.cancel()
                self._slots.release()

    def _acquire_or_abort(self) -> bool:
        while not self._slots.acquire(timeout=0.2):
            if self.abort.is_set():
                raise Aborted()
        return True
