"""How a revision's pods get verified weights.

vLLM never reads the source directly. An init container runs the loader (`slmfleet load`, the
project's own image) which fetches the manifest, refuses it unless its digest is the pin, then
copies every listed file into a pod-local volume, moving a file into place only when its SHA-256
matches. vLLM mounts that volume read-only and is started on a local path, never on a hub name.
The same holds for PVC sources: the claim is mounted read-only into the loader only, so what vLLM
serves is always what was pinned, even if someone rewrites files on the volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from slmfleet.api.config import OperatorConfig
from slmfleet.api.smallmodel import WeightsSource

MODELS_MOUNT_PATH = "/models"
MODEL_DIR = f"{MODELS_MOUNT_PATH}/model"
WEIGHTS_VOLUME = "weights"
SOURCE_VOLUME = "weights-source"
SOURCE_MOUNT_PATH = "/source"
CA_VOLUME = "s3-ca"
CA_MOUNT_PATH = "/etc/slmfleet/s3-ca"
LOADER_CONTAINER = "load-weights"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# Room in the pod-local copy beyond the weights themselves (tokenizer, configs, temporary .part files).
WEIGHTS_HEADROOM = 1.1
MIN_WEIGHTS_VOLUME_GIB = 1


class UnsupportedSource(ValueError):
    """The weights source cannot be served; the message says why, for a status condition."""


@dataclass(frozen=True)
class PvcSource:
    """`pvc://<claim>/<path>`: a claim and a directory inside its volume."""

    claim: str
    path: str  # relative to the volume root, without leading or trailing slashes; may be empty

    @property
    def loader_source(self) -> str:
        return f"{SOURCE_MOUNT_PATH}/{self.path}" if self.path else SOURCE_MOUNT_PATH


@dataclass(frozen=True)
class S3Source:
    uri: str


def parse_source(uri: str) -> PvcSource | S3Source:
    if uri.startswith("s3://"):
        return S3Source(uri)
    if not uri.startswith("pvc://"):
        raise UnsupportedSource(f"weights source {uri!r}: expected pvc://claim/path or s3://bucket/prefix/")
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    if not claim:
        raise UnsupportedSource(f"weights source {uri!r}: no claim name after pvc://")
    segments = [s for s in path.split("/") if s]
    # A path that climbs out of the volume root would point at the container's own file system.
    if any(s in (".", "..") for s in segments):
        raise UnsupportedSource(f"weights source {uri!r}: the path must not contain '.' or '..' segments")
    return PvcSource(claim=claim, path="/".join(segments))


def weights_volume_size(weights_bytes: int | None) -> str:
    gib = MIN_WEIGHTS_VOLUME_GIB if not weights_bytes else math.ceil(weights_bytes * WEIGHTS_HEADROOM / 2**30)
    return f"{max(gib, MIN_WEIGHTS_VOLUME_GIB)}Gi"


def weights_volumes(source: WeightsSource, weights_bytes: int | None) -> list[dict[str, Any]]:
    parsed = parse_source(source.uri)
    volumes = [{"name": WEIGHTS_VOLUME, "emptyDir": {"sizeLimit": weights_volume_size(weights_bytes)}}]
    if isinstance(parsed, PvcSource):
        volumes.append({"name": SOURCE_VOLUME, "persistentVolumeClaim": {"claimName": parsed.claim, "readOnly": True}})
    if source.s3 is not None and source.s3.ca_config_map is not None:
        ca = source.s3.ca_config_map
        volumes.append({"name": CA_VOLUME, "configMap": {"name": ca.name, "items": [{"key": ca.key, "path": "ca.pem"}]}})
    return volumes


def vllm_weights_mount() -> dict[str, Any]:
    return {"name": WEIGHTS_VOLUME, "mountPath": MODELS_MOUNT_PATH, "readOnly": True}


def _s3_env(source: WeightsSource) -> list[dict[str, Any]]:
    s3 = source.s3
    if s3 is None:
        return []
    env: list[dict[str, Any]] = [{"name": "AWS_DEFAULT_REGION", "value": s3.region}]
    if s3.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s3.endpoint})
    env.append({"name": "AWS_S3_ADDRESSING_STYLE", "value": "path" if s3.path_style else "virtual"})
    if s3.credentials_secret is not None:
        secret = s3.credentials_secret
        env += [
            {"name": "AWS_ACCESS_KEY_ID",
             "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.access_key_id_key}}},
            {"name": "AWS_SECRET_ACCESS_KEY",
             "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.secret_access_key_key}}},
        ]
    if s3.ca_config_map is not None:
        env.append({"name": "AWS_CA_BUNDLE", "value": f"{CA_MOUNT_PATH}/ca.pem"})
    return env


def loader_container(source: WeightsSource, config: OperatorConfig, security_context: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_source(source.uri)
    args = ["load", "--source", parsed.loader_source if isinstance(parsed, PvcSource) else parsed.uri,
            "--digest", source.digest, "--dest", MODEL_DIR,
            "--termination-message-path", TERMINATION_MESSAGE_PATH]
    if source.allow_pickle:
        args.append("--allow-pickle")
    mounts: list[dict[str, Any]] = [{"name": WEIGHTS_VOLUME, "mountPath": MODELS_MOUNT_PATH}]
    if isinstance(parsed, PvcSource):
        mounts.append({"name": SOURCE_VOLUME, "mountPath": SOURCE_MOUNT_PATH, "readOnly": True})
    if source.s3 is not None and source.s3.ca_config_map is not None:
        mounts.append({"name": CA_VOLUME, "mountPath": CA_MOUNT_PATH, "readOnly": True})
    return {
        "name": LOADER_CONTAINER,
        "image": config.loader_image,
        "imagePullPolicy": config.image_pull_policy,
        "args": args,
        "env": [{"name": "HOME", "value": "/tmp"}, *_s3_env(source)],
        "volumeMounts": mounts,
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": dict(security_context),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
