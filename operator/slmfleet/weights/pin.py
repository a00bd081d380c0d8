"""`pin`: the manifest and digest of a model directory, local or on S3, optionally stored beside it.

A local directory is hashed in place, several files at a time. An S3 prefix is listed and every
object streamed through SHA-256 in ranged reads (nothing is written locally). `write` stores the
canonical manifest as `slmfleet-manifest.json` beside the weights (an atomic rename locally, one
PUT on S3); its bytes hash to the digest.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmfleet.weights.errors import WeightsError
from slmfleet.weights.manifest import (
    DEFAULT_CHUNK_SIZE,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    manifest_of_directory,
)
from slmfleet.weights.progress import Progress
from slmfleet.weights.transfer import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PART_SIZE,
    Aborted,
    Fetcher,
    LocalSource,
    RetryPolicy,
    S3Source,
    Source,
    open_source,
    storage_error,
)


@dataclass(frozen=True)
class PinResult:
    manifest: Manifest
    seconds: float
    written_to: str | None = None
    previous_digest: str | None = None  # of the manifest stored beside the weights before, if any

    @property
    def digest(self) -> str:
        return self.manifest.digest


def _stderr_log(message: str) -> None:
    print(f"slmfleet pin: {message}", file=sys.stderr, flush=True)


def pin(uri_or_source: str | Source, *, write: bool = False, workers: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY, part_size: int = DEFAULT_PART_SIZE,
        chunk_size: int = DEFAULT_CHUNK_SIZE, retry: RetryPolicy | None = None,
        progress: bool | None = None, client_factory: Callable[[], Any] | None = None,
        log: Callable[[str], None] | None = None) -> PinResult:
    """Compute (and with `write`, store) the manifest of a directory or S3 prefix. Raises WeightsError."""
    log = _stderr_log if log is None else log
    retry = retry or RetryPolicy()
    source = open_source(uri_or_source, client_factory) if isinstance(uri_or_source, str) else uri_or_source
    t0 = time.monotonic()
    try:
        previous = _previous_digest(source, retry, log)
        if isinstance(source, LocalSource):
            manifest = manifest_of_directory(source.root, workers=workers, chunk_size=chunk_size, progress=progress)
        else:
            manifest = _manifest_of_source(source, concurrency=concurrency, part_size=part_size, retry=retry,
                                           progress=progress, log=log)
    except ManifestError as exc:
        raise WeightsError(f"{source.describe()} cannot be pinned: {exc}") from None
    except FileNotFoundError as exc:
        raise storage_error(exc, f"reading {source.describe()}", retry.attempts) from None
    seconds = time.monotonic() - t0
    written = None
    if write:
        written = source.describe(MANIFEST_NAME)
        try:
            if isinstance(source, LocalSource):
                write_local_manifest(source.root, manifest)
            elif isinstance(source, S3Source):
                retry.call(_put_manifest, source, manifest, what=f"PUT {written}", log=log)
            else:  # pragma: no cover
                raise WeightsError(f"cannot store a manifest at {written}")
        except WeightsError:
            raise
        except Exception as exc:
            raise storage_error(exc, f"writing {written}", retry.attempts) from exc
    return PinResult(manifest, seconds, written, previous)


def _previous_digest(source: Source, retry: RetryPolicy, log: Callable[[str], None]) -> str | None:
    try:
        raw = retry.call(source.read_manifest, what=f"reading {source.describe(MANIFEST_NAME)}", log=log)
    except WeightsError:
        raise
    except Exception as exc:
        raise storage_error(exc, f"reading {source.describe(MANIFEST_NAME)}", retry.attempts) from exc
    if raw is None:
        return None
    try:
        return Manifest.parse(raw).digest
    except ManifestError:
        return "sha256:" + hashlib.sha256(raw).hexdigest() + " (not a valid manifest)"


def write_local_manifest(root: str | os.PathLike[str], manifest: Manifest) -> Path:
    target = Path(root) / MANIFEST_NAME
    tmp = Path(root) / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(manifest.canonical_bytes)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def _put_manifest(source: S3Source, manifest: Manifest) -> None:
    source.client.put_object(Bucket=source.location.bucket, Key=source.location.key(MANIFEST_NAME),
                             Body=manifest.canonical_bytes, ContentType="application/json")


def _manifest_of_source(source: Source, *, concurrency: int, part_size: int, retry: RetryPolicy,
                        progress: bool | None, log: Callable[[str], None]) -> Manifest:
    """List a source and stream every file through SHA-256 (no local copy)."""
    what = f"listing {source.describe()}"
    try:
        listing = retry.call(source.list_files, what=what, log=log)
    except (WeightsError, ManifestError):
        raise
    except Exception as exc:
        raise storage_error(exc, what, retry.attempts) from exc
    listing.sort(key=lambda item: -item[1])
    with Progress("hashing", sum(size for _, size in listing), enabled=progress) as bar, \
            Fetcher(source, concurrency=concurrency, part_size=part_size, retry=retry, log=log) as fetcher:

        def one(item: tuple[str, int]) -> FileEntry:
            path, size = item
            h = hashlib.sha256()
            gen = fetcher.stream(path, 0, size)
            try:
                for chunk in gen:
                    h.update(chunk)
                    bar.add(len(chunk))
            except (Aborted, WeightsError):
                raise
            except Exception as exc:
                raise storage_error(exc, f"reading {source.describe(path)}", retry.attempts) from exc
            finally:
                gen.close()
            return FileEntry(path, size, h.hexdigest())

        if not listing:
            return Manifest.of([])
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(listing))), thread_name_prefix="pin") as pool:
            futures = [pool.submit(one, item) for item in listing]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done):
                fetcher.abort.set()
                wait(futures)
                errors = [f.exception() for f in futures if f.exception() is not None]
                raise next((e for e in errors if not isinstance(e, Aborted)), errors[0])  # type: ignore[misc]
            return Manifest.of(f.result() for f in futures)
