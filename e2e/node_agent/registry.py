"""Pulling images as a kubelet's container runtime does: resolve the reference on its registry,
read the manifest (by digest when the reference has one) and the image config.

The local cluster reaches exactly one registry, its loopback mirror (`crane registry serve` on
127.0.0.1). A reference to any other registry fails the way a pull fails in an air-gapped
cluster: the node never connects anywhere but loopback. Layers are not downloaded: containers
run as local processes, so what the node needs from an image is its config (entrypoint, cmd,
env, user) and the proof that the exact digest exists where the pod says it does.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

DEFAULT_REGISTRY = "docker.io"
PLATFORM = ("linux", "amd64")

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[0], MANIFEST_TYPES[2]

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class PullError(Exception):
    """The image cannot be pulled; the message reads like the runtime's."""


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def identifier(self) -> str:
        return self.digest or self.tag or "latest"

    def image_id(self, digest: str) -> str:
        """What the kubelet reports as containerStatus.imageID: `registry/repo@digest`."""
        return f"{self.registry}/{self.repository}@{digest}"


def parse_reference(image: str) -> Reference:
    """`127.0.0.1:5000/slmfleet/slmfleet:0.1.0@sha256:…` -> its parts, with Docker's defaults
    (docker.io, library/ for single-name images, tag latest)."""
    name, _, digest = image.partition("@")
    if digest and not _DIGEST.match(digest):
        raise PullError(f'failed to pull image "{image}": invalid reference format: bad digest {digest!r}')
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, path = parts[0], parts[1:]
    else:
        registry, path = DEFAULT_REGISTRY, parts
    last = path[-1]
    tag = None
    if ":" in last:
        last, tag = last.split(":", 1)
        path[-1] = last
    if registry == DEFAULT_REGISTRY and len(path) == 1:
        path = ["library", *path]
    if not tag and not digest:
        tag = "latest"
    return Reference(registry, "/".join(path), tag, digest or None)


@dataclass(frozen=True)
class PulledImage:
    reference: Reference
    digest: str  # the manifest digest the runtime pulled (of the platform manifest's parent if an index)
    config: Mapping[str, Any] = field(default_factory=dict)  # the OCI image config's "config" object
    size: int = 0

    @property
    def image_id(self) -> str:
        return self.reference.image_id(self.digest)

    @property
    def entrypoint(self) -> tuple[str, ...]:
        return tuple(self.config.get("Entrypoint") or ())

    @property
    def cmd(self) -> tuple[str, ...]:
        return tuple(self.config.get("Cmd") or ())

    @property
    def env(self) -> dict[str, str]:
        pairs = (e.split("=", 1) for e in self.config.get("Env") or [] if "=" in e)
        return {k: v for k, v in pairs}

    @property
    def user(self) -> str:
        return str(self.config.get("User") or "")


def docker_config_auth(secrets: list[Mapping[str, str]], registry: str) -> str | None:
    """The Authorization header value for `registry` from decoded imagePullSecrets data
    (`.dockerconfigjson` or the legacy `.dockercfg`), as the kubelet's keyring matches them."""
    for data in secrets:
        raw = data.get(".dockerconfigjson") or data.get(".dockercfg")
        if not raw:
            continue
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        auths = doc.get("auths", doc) if isinstance(doc, dict) else {}
        for host, entry in auths.items():
            if not isinstance(entry, dict):
                continue
            bare = host.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
            if bare != registry:
                continue
            if entry.get("auth"):
                return "Basic " + entry["auth"]
            if entry.get("username") is not None:
                pair = f"{entry['username']}:{entry.get('password', '')}".encode()
                return "Basic " + base64.b64encode(pair).decode()
    return None


class Registry:
    """The one registry this node can reach, on loopback."""

    def __init__(self, host: str | None):
        if host is not None and not ipaddress.ip_address(host.rsplit(":", 1)[0]).is_loopback:
            raise ValueError(f"the node's registry must be on loopback, not {host}")
        self.host = host  # "127.0.0.1:16449", or None: no registry at all

    def reachable(self, ref: Reference) -> bool:
        return self.host is not None and ref.registry == self.host

    async def pull(self, session: aiohttp.ClientSession, image: str, auth: str | None = None) -> PulledImage:
        ref = parse_reference(image)
        if not self.reachable(ref):
            mirror = f"its loopback registry {self.host}" if self.host else "no registry"
            raise PullError(f'failed to pull and unpack image "{image}": failed to resolve reference '
                            f'"{image}": {ref.registry} is not reachable: the local cluster reaches only {mirror}')
        headers = {"Authorization": auth} if auth else {}
        manifest, digest = await self._manifest(session, ref, ref.identifier, headers, image)
        if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            chosen = next((m for m in manifest.get("manifests") or []
                           if (m.get("platform") or {}).get("os") == PLATFORM[0]
                           and (m.get("platform") or {}).get("architecture") == PLATFORM[1]), None)
            if chosen is None:
                raise PullError(f'failed to pull and unpack image "{image}": no match for platform in manifest: not found')
            manifest, _ = await self._manifest(session, ref, chosen["digest"], headers, image)
        config_digest = manifest["config"]["digest"]
        config = await self._blob(session, ref, config_digest, headers, image)
        size = sum(int(layer.get("size", 0)) for layer in manifest.get("layers") or [])
        return PulledImage(ref, digest, (json.loads(config).get("config") or {}), size)

    async def _manifest(self, session: aiohttp.ClientSession, ref: Reference, identifier: str,
                        headers: dict[str, str], image: str) -> tuple[dict[str, Any], str]:
        url = f"http://{self.host}/v2/{ref.repository}/manifests/{identifier}"
        body = await self._get(session, url, dict(headers, Accept=", ".join(MANIFEST_TYPES)), image)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if identifier.startswith("sha256:") and digest != identifier:
            raise PullError(f'failed to pull and unpack image "{image}": manifest digest {digest} '
                            f'does not match {identifier}')
        return json.loads(body), digest

    async def _blob(self, session: aiohttp.ClientSession, ref: Reference, digest: str,
                    headers: dict[str, str], image: str) -> bytes:
        body = await self._get(session, f"http://{self.host}/v2/{ref.repository}/blobs/{digest}", headers, image)
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise PullError(f'failed to pull and unpack image "{image}": blob {digest} failed its digest check')
        return body

    @staticmethod
    async def _get(session: aiohttp.ClientSession, url: str, headers: dict[str, str], image: str) -> bytes:
        try:
            # No redirects: a registry could otherwise send the node off loopback (e.g. to blob storage).
            async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30),
                                   allow_redirects=False) as resp:
                body = await resp.read()
                if resp.status == 404:
                    raise PullError(f'failed to pull and unpack image "{image}": failed to resolve reference '
                                    f'"{image}": {image}: not found')
                if resp.status in (401, 403):
                    raise PullError(f'failed to pull and unpack image "{image}": failed to authorize: '
                                    f'{resp.status} {resp.reason}')
                if resp.status >= 400:
                    raise PullError(f'failed to pull and unpack image "{image}": unexpected status {resp.status} '
                                    f'from GET {url}')
                return body
        except (aiohttp.ClientError, OSError) as exc:
            raise PullError(f'failed to pull and unpack image "{image}": failed to do request: {exc}') from exc
