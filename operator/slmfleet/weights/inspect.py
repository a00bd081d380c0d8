"""Read what sizing needs from weights in S3 without downloading them.

Order matters: the manifest comes first and is refused unless its digest is the pin, so nothing
else is read from a source that does not hold the pinned weights. `config.json` and the
safetensors index are small and are checked against the manifest's hashes; safetensors headers
are read with two ranged GETs per file (the 8-byte length, then the JSON header) and give the
exact bytes of every tensor. The pickle policy is decided here too, before any pod is created.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from slmfleet.weights import s3 as s3mod
from slmfleet.weights.facts import WeightsFacts
from slmfleet.weights.loader import pickle_files  # the loader's own list: refused early exactly as in the pod
from slmfleet.weights.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ManifestError
from slmfleet.weights.safetensors import SafetensorsError, read_header, tensor_bytes

INDEX_NAME = "model.safetensors.index.json"
MAX_SMALL_FILE = 16 * 1024 * 1024  # config.json and the index are kilobytes; refuse anything odd


def s3_client(*, endpoint_url: str | None, region: str | None, path_style: bool, ca_bundle: str | None,
              access_key_id: str | None, secret_access_key: str | None) -> Any:
    """A client with the model's own credentials (the operator serves many namespaces, each with
    its own Secret). Without a Secret the requests are anonymous: the operator's own identity must
    never read a tenant's bucket on the tenant's behalf."""
    settings = s3mod.S3Settings(
        endpoint_url=endpoint_url, region=region, addressing_style="path" if path_style else "virtual",
        ca_bundle=ca_bundle, connect_timeout=5.0, read_timeout=20.0, max_attempts=3,
    )
    anonymous = not (access_key_id and secret_access_key)
    return settings.client(access_key_id=access_key_id, secret_access_key=secret_access_key, anonymous=anonymous)


def _get(client: Any, bucket: str, key: str, limit: int = MAX_SMALL_FILE) -> bytes:
    """A whole small object, streamed with a cap whatever Content-Length says
    (s3.ReadLimitExceeded, a ValueError, past it)."""
    return s3mod.get_capped(client, bucket, key, limit, what=key)


def inspect_s3(client: Any, uri: str, pin: str, *, allow_pickle: bool) -> WeightsFacts:
    """The facts of the pinned weights at `uri`: the manifest checked against the pin, then
    config.json (checked against the manifest) and the weights' exact size; or the problem."""
    location = s3mod.S3Location.parse(uri)
    where = location.uri()
    try:
        manifest = _pinned_manifest(client, location, pin, allow_pickle)
        if isinstance(manifest, WeightsFacts):
            return manifest  # the problem
        config, weights_bytes, notes = _sizes(client, location, manifest)
        return WeightsFacts(digest=pin, config=config, weights_bytes=weights_bytes,
                            files=tuple(e.path for e in manifest.files), disk_bytes=manifest.total_size,
                            notes=tuple(notes))
    except _Tampered as exc:
        return WeightsFacts(
            digest=pin, problem="FileMismatch",
            message=f"{where}{exc.path} does not have the sha256 the pinned manifest lists",
        )
    except (SafetensorsError, json.JSONDecodeError, ValueError) as exc:
        return WeightsFacts(digest=pin, problem="WeightsUnreadable", message=f"{where}: {exc}")
    except (ClientError, BotoCoreError) as exc:
        transient = not isinstance(exc, ClientError) or s3mod.is_retryable(exc)
        return WeightsFacts(digest=pin, problem="StorageUnreachable" if transient else "StorageDenied",
                            message=f"{where}: {s3mod.describe_error(exc)}", transient=transient)


def _pinned_manifest(client: Any, location: s3mod.S3Location, pin: str, allow_pickle: bool) -> Manifest | WeightsFacts:
    """The manifest at the location if it is the pinned one and names no refused file; else the problem."""
    where = location.uri()
    try:
        raw = _get(client, location.bucket, location.key(MANIFEST_NAME), MAX_MANIFEST_BYTES)
    except ClientError as exc:
        if s3mod.is_not_found(exc):
            return WeightsFacts(
                digest=pin, problem="ManifestMissing",
                message=f"{where} has no {MANIFEST_NAME}; run `slmfleet pin {where} --write` and pin its digest",
            )
        raise
    try:
        manifest = Manifest.parse(raw)
    except ManifestError as exc:
        return WeightsFacts(digest=pin, problem="ManifestInvalid", message=f"{where}{MANIFEST_NAME}: {exc}")
    if manifest.digest != pin:
        return WeightsFacts(
            digest=pin, problem="DigestMismatch",
            message=f"the manifest at {where} has digest {manifest.digest}, not the pinned {pin}; "
            "nothing was downloaded",
        )
    files = tuple(e.path for e in manifest.files)
    pickles = pickle_files(files)
    if pickles and not allow_pickle:
        return WeightsFacts(
            digest=pin, files=files, problem="PickleRefused",
            message=f"pickle files can run code when loaded and are refused: {', '.join(pickles[:5])}; "
            "convert them to safetensors, or set spec.source.allowPickle: true to accept the risk",
        )
    return manifest


def _sizes(client: Any, location: s3mod.S3Location, manifest: Manifest) -> tuple[Any, int | None, list[str]]:
    """config.json and the weights' exact size (from the index, else every shard's header)."""
    entries = manifest.by_path
    notes: list[str] = []

    def small(path: str) -> bytes | None:
        if path not in entries:
            return None
        data = _get(client, location.bucket, location.key(path))
        if hashlib.sha256(data).hexdigest() != entries[path].sha256:
            raise _Tampered(path)
        return data

    config = None
    if (data := small("config.json")) is not None:
        config = json.loads(data)
    else:
        notes.append("no config.json in the manifest")
    weights_bytes = None
    if (data := small(INDEX_NAME)) is not None:
        total = (json.loads(data).get("metadata") or {}).get("total_size")
        weights_bytes = int(total) if total else None
    shards = [e.path for e in manifest.files if e.path.endswith(".safetensors")]
    if weights_bytes is None and shards:
        weights_bytes = 0
        for path in shards:
            header = read_header(functools.partial(s3mod.read_range, client, location.bucket, location.key(path)))
            weights_bytes += tensor_bytes(header)
    return config, weights_bytes, notes


class _Tampered(Exception):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path
