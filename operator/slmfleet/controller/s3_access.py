"""An S3 client for a resource's `s3` settings: credentials from the Secret it names, its CA bundle
from a ConfigMap, anonymous without a Secret. The weights reader (a SmallModel's source) and the
evaluations (a ModelRollout's dataset) read S3 the same way. Secret values go to the client only."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from slmfleet.api.config import S3_HOST_PATTERN, S3EndpointRule, host_matches
from slmfleet.api.smallmodel import (
    DATA_KEY_PATTERN,
    DEFAULT_ACCESS_KEY_ID_KEY,
    DEFAULT_SECRET_ACCESS_KEY_KEY,
    S3Settings,
    SecretKeys,
)
from slmfleet.k8s.client import KubeClient
from slmfleet.weights.inspect import s3_client


class S3AccessError(Exception):
    """The S3 settings may not be used, or the Secret or the CA ConfigMap could not be read; the
    message names no secret value. `reason` is the condition reason."""

    def __init__(self, message: str, reason: str = "CredentialsUnavailable") -> None:
        super().__init__(message)
        self.reason = reason


CREDENTIALS_LABEL = "slmfleet.io/s3-credentials"
ENDPOINTS_ANNOTATION = "slmfleet.io/s3-endpoints"
MAX_ANNOTATED_HOSTS = 32
# Keys other than the defaults the Secret lets be read as credentials (comma-separated).
CREDENTIAL_KEYS_ANNOTATION = "slmfleet.io/s3-credential-keys"
MAX_ANNOTATED_KEYS = 32

# CA bundles are written to a private temp dir for boto3, one file per distinct content. At most
# MAX_CA_FILES of them, the least recently used pruned first; never one used within
# CA_FILE_IN_USE_SECONDS (a read in progress may open it for a new connection: the weights read's
# deadline is 120 s, its threads may outlive that by their own timeouts).
MAX_CA_FILES = 64
CA_FILE_IN_USE_SECONDS = 600.0
MAX_CA_BYTES = 1024 * 1024  # a ConfigMap's own limit
_PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"


def endpoint_of(s3: S3Settings | None) -> tuple[str, str, int]:
    """Scheme, host and port the settings send requests to (AWS's regional endpoint without one)."""
    if s3 is None or s3.endpoint is None:
        return "https", f"s3.{s3.region if s3 else 'us-east-1'}.amazonaws.com", 443
    parts = urlsplit(s3.endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def endpoint_refusal(s3: S3Settings | None, rules: Sequence[S3EndpointRule]) -> str | None:
    """Why the platform's allow-list refuses the settings' endpoint; None when a rule admits it.
    The message names the rule, not the tenant's endpoint (it is in the spec already)."""
    try:
        scheme, host, port = endpoint_of(s3)
    except ValueError:
        return "the S3 endpoint is not a valid URL"
    if any(rule.admits(scheme, host, port) for rule in rules):
        return None
    if not rules:
        return "the operator's s3Endpoints allow-list is empty: the platform team has allowed no S3 endpoint"
    plain = " over plain http" if scheme == "http" and any(r.admits("https", host, port) for r in rules) else ""
    return (f"the S3 endpoint is not on the operator's s3Endpoints allow-list{plain}; allowed hosts: "
            + ", ".join(sorted({r.host for r in rules}))[:500])


def _listed(annotation: str | None, limit: int, pattern: str) -> list[str] | None:
    """A comma-separated annotation of the Secret: its first `limit` entries that match `pattern`
    (others are ignored, never echoed); None without the annotation."""
    if annotation is None:
        return None
    return [entry for entry in (e.strip() for e in annotation.split(",")[:limit]) if re.fullmatch(pattern, entry)]


def _secret_admits(annotations: dict[str, str], host: str) -> bool:
    """Whether the Secret's own endpoint annotation (if any) lets it be sent to `host`."""
    listed = annotations.get(ENDPOINTS_ANNOTATION)
    patterns = _listed(listed.lower() if listed is not None else None, MAX_ANNOTATED_HOSTS, S3_HOST_PATTERN)
    return patterns is None or any(host_matches(p, host) for p in patterns)


def _keys_refusal(annotations: dict[str, str], ref: SecretKeys) -> str | None:
    """Which of the spec's key fields name a key the Secret does not let be read as credentials
    (the defaults always may be; others only if its annotation lists them); None when all may."""
    allowed = set(_listed(annotations.get(CREDENTIAL_KEYS_ANNOTATION), MAX_ANNOTATED_KEYS, DATA_KEY_PATTERN) or ())
    refused = [field for field, key, default in (
        ("accessKeyIdKey", ref.access_key_id_key, DEFAULT_ACCESS_KEY_ID_KEY),
        ("secretAccessKeyKey", ref.secret_access_key_key, DEFAULT_SECRET_ACCESS_KEY_KEY),
    ) if key != default and key not in allowed]
    return " and ".join(refused) or None


def api_failure(exc: BaseException) -> str:
    """An API read failure in a few words (the ApiException's reason, or the type)."""
    if isinstance(exc, KeyError):
        return f"no key {exc}"
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if reason:
        return f"{reason} (HTTP {status})" if status else str(reason)
    return type(exc).__name__


class _CaFiles:
    """The CA bundle files: content-addressed, bounded, thread-safe."""

    def __init__(self, max_files: int = MAX_CA_FILES, in_use_seconds: float = CA_FILE_IN_USE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_files = max_files
        self.in_use_seconds = in_use_seconds
        self.clock = clock
        self.dir: Path | None = None
        self._used: OrderedDict[str, float] = OrderedDict()  # file name -> last use, least recent first
        self._lock = threading.Lock()

    def path(self, pem: str, where: str) -> str:
        """The file holding `pem`, written on first use. Raises S3AccessError (naming `where`, never
        the content) for a bundle too large or without a certificate, or when every file is in use."""
        data = pem.encode()
        if len(data) > MAX_CA_BYTES:
            raise S3AccessError(f"{where}: the CA bundle is larger than {MAX_CA_BYTES >> 20} MiB")
        if _PEM_CERTIFICATE not in pem:
            raise S3AccessError(f"{where}: the CA bundle holds no PEM certificate ({_PEM_CERTIFICATE} block)")
        name = hashlib.sha256(data).hexdigest()[:32] + ".pem"
        with self._lock:
            if self.dir is None:
                self.dir = Path(tempfile.mkdtemp(prefix="slmfleet-ca-"))
            now = self.clock()
            if name not in self._used:
                self._prune(now)
            path = self.dir / name
            if not path.exists():
                tmp = self.dir / (name + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)  # a reader never sees half a bundle
            self._used[name] = now
            self._used.move_to_end(name)
            return str(path)

    def _prune(self, now: float) -> None:
        """Room for one more file: the least recently used go, unless used recently."""
        assert self.dir is not None
        while len(self._used) >= self.max_files:
            oldest, used = next(iter(self._used.items()))
            if now - used < self.in_use_seconds:
                raise S3AccessError(f"{self.max_files} distinct CA bundles are in use: try again in a few minutes")
            (self.dir / oldest).unlink(missing_ok=True)
            del self._used[oldest]


_CA_FILES = _CaFiles()


async def s3_client_for(client: KubeClient, namespace: str, s3: S3Settings | None,
                        rules: Sequence[S3EndpointRule]) -> Any:
    """A client for the settings, if the platform allows their endpoint and the Secret they name
    opted in to being S3 credentials (for that endpoint). Raises S3AccessError before any
    connection to the endpoint otherwise."""
    refusal = endpoint_refusal(s3, rules)
    if refusal is not None:
        raise S3AccessError(refusal, "EndpointNotAllowed")
    access_key = secret_key = ca_bundle = None
    if s3 is not None and s3.credentials_secret is not None:
        ref = s3.credentials_secret
        try:
            secret = await client.read_secret_object(namespace, ref.name)
        except Exception as exc:  # noqa: BLE001 - any failure means: no credentials (yet)
            raise S3AccessError(f"Secret {namespace}/{ref.name}: {api_failure(exc)}") from None
        if secret.labels.get(CREDENTIALS_LABEL) != "true":
            raise S3AccessError(f"Secret {namespace}/{ref.name} is not labelled {CREDENTIALS_LABEL}=true: only a "
                                "Secret that says it holds S3 credentials is sent to S3", "CredentialsNotAllowed")
        if not _secret_admits(secret.annotations, endpoint_of(s3)[1]):
            raise S3AccessError(f"Secret {namespace}/{ref.name} does not allow this endpoint (its "
                                f"{ENDPOINTS_ANNOTATION} annotation)", "CredentialsNotAllowed")
        if (fields := _keys_refusal(secret.annotations, ref)) is not None:
            raise S3AccessError(f"Secret {namespace}/{ref.name} does not list the key(s) named by {fields} in "
                                f"its {CREDENTIAL_KEYS_ANNOTATION} annotation; only {DEFAULT_ACCESS_KEY_ID_KEY}, "
                                f"{DEFAULT_SECRET_ACCESS_KEY_KEY} and the keys listed there are read as S3 credentials",
                                "CredentialsNotAllowed")
        try:
            access_key, secret_key = secret.data[ref.access_key_id_key], secret.data[ref.secret_access_key_key]
        except KeyError as exc:
            raise S3AccessError(f"Secret {namespace}/{ref.name}: {api_failure(exc)}") from None
    if s3 is not None and s3.ca_config_map is not None:
        ref_ca = s3.ca_config_map
        try:
            pem = (await client.read_config_map(namespace, ref_ca.name))[ref_ca.key]
        except Exception as exc:  # noqa: BLE001
            raise S3AccessError(f"ConfigMap {namespace}/{ref_ca.name}: CA bundle unavailable ({api_failure(exc)})") from None
        # Hashing and writing up to 1 MiB: off the event loop (the files are guarded by a lock).
        ca_bundle = await asyncio.to_thread(_CA_FILES.path, pem, f"ConfigMap {namespace}/{ref_ca.name} key {ref_ca.key}")
    return s3_client(
        endpoint_url=s3.endpoint if s3 else None, region=s3.region if s3 else None,
        path_style=s3.path_style if s3 else True, ca_bundle=ca_bundle,
        access_key_id=access_key, secret_access_key=secret_key,
    )
