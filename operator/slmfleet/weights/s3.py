"""S3 access for the weights: locations, a client configured the standard way, ranged reads.

Settings come from the environment as the AWS tools read them, and flags may override them:

- `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (`endpoint_url`): a custom endpoint (MinIO, Ceph, ...).
- `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`): read by boto3's usual
  credential chain, never by this module, and never printed.
- `AWS_DEFAULT_REGION` or `AWS_REGION` (`region`); with a custom endpoint and no region, us-east-1.
- `AWS_S3_ADDRESSING_STYLE` = `path` | `virtual` | `auto` (`path_style=True` means `path`); the
  default is `path` with a custom endpoint (what on-premises stores serve), else `auto`.
- `AWS_CA_BUNDLE` (`ca_bundle`): a PEM bundle to verify the endpoint's certificate.

Checksums: responses are not required to carry the new CRC checksums and requests compute them only
when an operation requires it, which keeps third-party stores working; integrity is SHA-256 against
the manifest anyway.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)


class S3UriError(ValueError):
    pass


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,62}$")


@dataclass(frozen=True)
class S3Location:
    """`s3://bucket/prefix/`: a bucket and a key prefix that is empty or ends in `/`."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        """`s3://bucket`, `s3://bucket/`, `s3://bucket/a/b` and `s3://bucket/a/b/` all name a
        directory: the prefix gets a trailing `/` (`a/b/`), or is empty for the whole bucket."""
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise S3UriError(f"{uri!r} is not an s3://bucket/prefix/ URI")
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not _BUCKET_RE.match(bucket):
            raise S3UriError(f"{uri!r}: {bucket!r} is not a valid bucket name")
        segments = prefix.split("/")
        if prefix.endswith("/"):
            segments = segments[:-1]
        if prefix and any(s in ("", ".", "..") for s in segments):
            raise S3UriError(f"{uri!r}: the prefix has an empty, '.' or '..' segment")
        return cls(bucket, "/".join(segments) + "/" if prefix.strip("/") else "")

    def key(self, path: str) -> str:
        return self.prefix + path

    def relative(self, key: str) -> str:
        if not key.startswith(self.prefix):
            raise ValueError(f"{key!r} is not under {self.prefix!r}")
        return key[len(self.prefix):]

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{path}"

    def __str__(self) -> str:
        return self.uri()


ADDRESSING_STYLES = ("path", "virtual", "auto")


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str | None = None  # None: path with a custom endpoint, else auto
    ca_bundle: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 3  # botocore's own attempts per request (the loader sets 1 and retries itself)
    max_pool_connections: int = 10

    @classmethod
    def from_env(cls, overrides: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if environ is None else environ
        style = (env.get("AWS_S3_ADDRESSING_STYLE") or "").strip().lower() or None
        settings = cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or None,
            addressing_style=style,
            ca_bundle=env.get("AWS_CA_BUNDLE") or None,
        )
        changes = dict(overrides or {})
        path_style = changes.pop("path_style", None)
        if path_style is not None:
            changes["addressing_style"] = "path" if path_style else "virtual"
        known = {f.name for f in fields(cls)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown S3 settings: {sorted(unknown)}")
        settings = replace(settings, **{k: v for k, v in changes.items() if v is not None})
        if settings.addressing_style not in (None, *ADDRESSING_STYLES):
            raise ValueError(f"addressing style {settings.addressing_style!r} is not one of {ADDRESSING_STYLES}")
        return settings

    @property
    def effective_addressing_style(self) -> str:
        return self.addressing_style or ("path" if self.endpoint_url else "auto")

    @property
    def effective_region(self) -> str | None:
        return self.region or ("us-east-1" if self.endpoint_url else None)

    def describe(self) -> str:
        """For logs: never includes credentials."""
        parts = [f"endpoint {self.endpoint_url or 'AWS'}", f"{self.effective_addressing_style}-style"]
        if self.effective_region:
            parts.append(f"region {self.effective_region}")
        if self.ca_bundle:
            parts.append(f"CA bundle {self.ca_bundle}")
        return ", ".join(parts)

    def client(self, *, access_key_id: str | None = None, secret_access_key: str | None = None,
               anonymous: bool = False) -> Any:
        """A client; credentials come from the environment unless a key pair is given, or from
        nowhere with `anonymous` (unsigned requests)."""
        config = Config(
            signature_version=UNSIGNED if anonymous else None,
            s3={"addressing_style": self.effective_addressing_style},
            retries={"total_max_attempts": max(1, self.max_attempts), "mode": "standard"},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=self.max_pool_connections,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # One session per client: sessions are not thread-safe, clients are.
        session = boto3.session.Session(aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key)
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=self.effective_region,
                              verify=self.ca_bundle or None, config=config)


def client_from_env(overrides: Mapping[str, Any] | None = None, *,
                    environ: Mapping[str, str] | None = None) -> Any:
    """An S3 client configured from the environment (see the module doc), with `overrides`
    (keys: endpoint_url, region, path_style, addressing_style, ca_bundle, connect_timeout,
    read_timeout, max_attempts, max_pool_connections; None values are ignored)."""
    return S3Settings.from_env(overrides, environ).client()


# --- bounded reads ---------------------------------------------------------------------------------
#
# Every GET body is read in chunks up to a cap that the caller chooses, whatever Content-Length
# says (a server may send none, or lie) and whether or not the server honoured a Range header (one
# that ignores it sends the whole object with 200). Reading stops at the cap; the connection is
# closed rather than drained.

READ_CHUNK = 1024 * 1024


class ReadLimitExceeded(ValueError):
    """A response body longer than its reader allows. The message names the object and the limit,
    never anything the server sent."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} is larger than {limit} bytes")
        self.what, self.limit = what, limit


def read_upto(body: Any, n: int, *, chunk_size: int = READ_CHUNK) -> bytes:
    """At most `n` bytes of a streaming body (botocore's StreamingBody, a file object), in reads of
    at most `chunk_size`; fewer when the body ends sooner. What follows is left unread."""
    if n <= 0:
        return b""
    buf = bytearray()
    while len(buf) < n:
        chunk = body.read(min(chunk_size, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def skip(body: Any, n: int, *, chunk_size: int = READ_CHUNK) -> int:
    """Read and discard `n` bytes (fewer if the body ends sooner), one chunk at a time; how many."""
    done = 0
    while done < n:
        chunk = body.read(min(chunk_size, n - done))
        if not chunk:
            break
        done += len(chunk)
    return done


def read_capped(body: Any, limit: int, what: str = "the object", *, chunk_size: int = READ_CHUNK) -> bytes:
    """The whole body if it has at most `limit` bytes, else ReadLimitExceeded (after reading at most
    one byte more than the limit)."""
    data = read_upto(body, limit + 1, chunk_size=chunk_size)
    if len(data) > limit:
        raise ReadLimitExceeded(what, limit)
    return data


def get_capped(client: Any, bucket: str, key: str, limit: int, what: str | None = None) -> bytes:
    """A whole object of at most `limit` bytes with one GET; ReadLimitExceeded for a larger one,
    before reading when Content-Length says so, else as soon as the body passes the limit."""
    what = what or f"s3://{bucket}/{key}"
    resp = client.get_object(Bucket=bucket, Key=key)
    body = resp["Body"]
    try:
        length = resp.get("ContentLength")
        if isinstance(length, int) and length > limit:
            raise ReadLimitExceeded(what, limit)
        return read_capped(body, limit, what)
    finally:
        body.close()


def range_body(resp: Any, start: int, length: int, what: str = "the object") -> bytes:
    """The bytes [start, start+length) from the response to a GET with `Range: bytes=start-end`,
    never reading more than that: a store that honoured the Range (206, or a Content-Range) sends
    at most `length` bytes (more is ReadLimitExceeded); one that ignored it (200 without
    Content-Range: the whole object) has the first `start` bytes skipped and the rest left unread.
    Fewer bytes come back when the object ends sooner. Closes the body."""
    body = resp["Body"]
    try:
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if resp.get("ContentRange") or status != 200:
            return read_capped(body, length, f"{what} (bytes {start}-{start + length - 1})")
        if skip(body, start) < start:  # the store ignored the Range header: read only what was asked
            return b""
        return read_upto(body, length)
    finally:
        body.close()


def read_range(client: Any, bucket: str, key: str, start: int, length: int) -> bytes:
    """Bytes [start, start+length) of an object with one ranged GET, reading no more than that
    (see `range_body`). Fewer bytes come back when the object ends sooner; a start past the end
    raises the store's ClientError (InvalidRange)."""
    if start < 0 or length < 0:
        raise ValueError("start and length must not be negative")
    if length == 0:
        return b""
    resp = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
    return range_body(resp, start, length, f"s3://{bucket}/{key}")


def content_range_total(value: str | None) -> int | None:
    """The object size from a `Content-Range: bytes a-b/total` header, if it says."""
    if not value:
        return None
    m = re.match(r"^bytes \d+-\d+/(\d+)$", value.strip())
    return int(m.group(1)) if m else None


def list_objects(client: Any, location: S3Location) -> Iterator[tuple[str, int]]:
    """(key relative to the prefix, size) of every object under the prefix, in key order, without
    the zero-byte "folder" markers some tools create (keys ending in `/`)."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=location.bucket, Prefix=location.prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/") and obj.get("Size", 0) == 0:
                continue
            yield location.relative(key), int(obj["Size"])


# --- errors ----------------------------------------------------------------------------------------

RETRYABLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "RequestThrottled", "SlowDown", "TooManyRequestsException", "RequestLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "PriorRequestNotComplete", "BandwidthLimitExceeded", "EC2ThrottledException",
})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def http_status(exc: BaseException) -> int | None:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    return None


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and (error_code(exc) in NOT_FOUND_CODES or
                                             (http_status(exc) == 404 and error_code(exc) != "NoSuchBucket"))


def is_retryable(exc: BaseException) -> bool:
    """Throttling, 5xx, connection resets and timeouts: worth another attempt."""
    if isinstance(exc, ClientError):
        status = http_status(exc) or 0
        return error_code(exc) in RETRYABLE_CODES or status >= 500 or status == 429
    if isinstance(exc, SSLError):
        return False  # a certificate problem does not go away by asking again
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return True  # connection refused/closed/reset, connect and read timeouts, broken streams
    return isinstance(exc, (ConnectionError, TimeoutError))


def is_credentials_error(exc: BaseException) -> bool:
    return isinstance(exc, (NoCredentialsError, PartialCredentialsError))


_ERROR_CODE = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,63}")
MAX_ERROR_TEXT = 300


def describe_error(exc: BaseException) -> str:
    """A one-line account of a storage error, without request headers or credentials. The
    server's own error message is left out: it is remote text (an endpoint may echo the signed
    request, access key id included), so only its error code, if it looks like one, and the HTTP
    status are kept. This text reaches status, Events, logs and termination messages."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code") or "")
        status = http_status(exc)
        shown = code if _ERROR_CODE.fullmatch(code) else "error"
        return f"{shown}{f' (HTTP {status})' if status else ''}"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())[:MAX_ERROR_TEXT]
