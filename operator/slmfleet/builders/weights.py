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
from slmfleet.builders.scratch import TMP_DIR, tmp_mount

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

# The loader's resources. Its memory is bounded by design, not by the model: ranges of 8 MiB, at
# most 16 buffered (2 x 8 in flight, transfer.Fetcher), streamed to disk while hashed. Peak RSS of
# `slmfleet load` with the defaults the pod uses, measured with /usr/bin/time -v (Python 3.11):
# 350 MiB from S3 (a local MinIO, 13 files, 1.0 GiB), 297 MiB from a local directory (the pvc://
# path, same files), 176 MiB for one 2 GiB file. The limit is ~3x the highest: an OOM-killed
# loader starts the pod's start-up over. (The page cache of the files it writes counts against
# the limit too, but the kernel writes it back and reclaims it before it kills; the loader also
# fsyncs each file.) Requests equal to the limit: the loader's memory is never overcommitted.
LOADER_PEAK_RSS_MIB = 350  # the highest measured, above
LOADER_MEMORY = "1Gi"
LOADER_CPU_REQUEST = "1"
# CPU: those loads used 0.6 to 1.1 CPUs (user + system over wall time, 2-CPU machine). SHA-256 ran
# at 0.75 GiB/s on one of its cores; files are hashed in parallel, so a limit of two keeps hashing
# from being the bottleneck below ~1.5 GiB/s (12 Gbit/s), within what a replica's node has to
# spare (vLLM, which requests 2 CPUs per GPU, does not run yet while the loader does).
LOADER_CPU_LIMIT = "2"


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


def loader_container(
    source: WeightsSource, config: OperatorConfig, security_context: dict[str, Any], *, hardened: bool
) -> dict[str, Any]:
    """The init container. `hardened` (builders/pod.py): CPU and memory limits, and a read-only
    root file system (in `security_context`) with the pod's /tmp volume as its HOME."""
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
    resources: dict[str, Any] = {"requests": {"cpu": LOADER_CPU_REQUEST, "memory": LOADER_MEMORY}}
    if hardened:
        # It writes the weights volume and its termination message, which the kubelet mounts
        # writable. HOME is /tmp: give it the pod's tmp volume, where boto3 may look for ~/.aws.
        mounts.append(tmp_mount())
        resources["limits"] = {"cpu": LOADER_CPU_LIMIT, "memory": LOADER_MEMORY}
    return {
        "name": LOADER_CONTAINER,
        "image": config.loader_image,
        "imagePullPolicy": config.image_pull_policy,
        "args": args,
        "env": [{"name": "HOME", "value": TMP_DIR}, *_s3_env(source)],
        "volumeMounts": mounts,
        "resources": resources,
        "securityContext": dict(security_context),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
