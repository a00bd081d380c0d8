"""An S3 client for a resource's `s3` settings: credentials from the Secret it names, its CA bundle
from a ConfigMap, anonymous without a Secret. The weights reader (a SmallModel's source) and the
evaluations (a ModelRollout's dataset) read S3 the same way. Secret values go to the client only."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from slmfleet.api.smallmodel import S3Settings
from slmfleet.k8s.client import KubeClient
from slmfleet.weights.inspect import s3_client

_CA_DIR: Path | None = None


class S3AccessError(Exception):
    """The Secret or the CA ConfigMap could not be read; the message names no secret value."""


def api_failure(exc: BaseException) -> str:
    """An API read failure in a few words (the ApiException's reason, or the type)."""
    if isinstance(exc, KeyError):
        return f"no key {exc}"
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if reason:
        return f"{reason} (HTTP {status})" if status else str(reason)
    return type(exc).__name__


def _ca_file(pem: str) -> str:
    """A CA bundle written once per content to a private temp dir (boto3 wants a path)."""
    global _CA_DIR
    if _CA_DIR is None:
        _CA_DIR = Path(tempfile.mkdtemp(prefix="slmfleet-ca-"))
    path = _CA_DIR / (hashlib.sha256(pem.encode()).hexdigest()[:16] + ".pem")
    if not path.exists():
        path.write_text(pem)
    return str(path)


async def s3_client_for(client: KubeClient, namespace: str, s3: S3Settings | None) -> Any:
    access_key = secret_key = ca_bundle = None
    if s3 is not None and s3.credentials_secret is not None:
        ref = s3.credentials_secret
        try:
            data = await client.read_secret(namespace, ref.name)
            access_key, secret_key = data[ref.access_key_id_key], data[ref.secret_access_key_key]
        except Exception as exc:  # noqa: BLE001 - any failure means: no credentials (yet)
            raise S3AccessError(f"Secret {namespace}/{ref.name}: {api_failure(exc)}") from None
    if s3 is not None and s3.ca_config_map is not None:
        ref_ca = s3.ca_config_map
        try:
            pem = (await client.read_config_map(namespace, ref_ca.name))[ref_ca.key]
        except Exception as exc:  # noqa: BLE001
            raise S3AccessError(f"ConfigMap {namespace}/{ref_ca.name}: CA bundle unavailable ({api_failure(exc)})") from None
        ca_bundle = _ca_file(pem)
    return s3_client(
        endpoint_url=s3.endpoint if s3 else None, region=s3.region if s3 else None,
        path_style=s3.path_style if s3 else True, ca_bundle=ca_bundle,
        access_key_id=access_key, secret_access_key=secret_key,
    )
