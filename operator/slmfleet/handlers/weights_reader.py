"""Reading weights facts for S3 sources before planning: credentials from the referenced Secret,
the CA bundle from the referenced ConfigMap, then `slmfleet.weights.inspect` in a thread.

Verdicts on the bytes (a digest that is not the pin, refused pickle files, a file that does not
match the manifest) and successful reads are cached by (uri, digest): pinned bytes do not change.
Failures that can heal (storage unreachable, a Secret not created yet, access denied) are cached
for RETRY_SECONDS only, so a broken endpoint is not hammered by every watch event.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slmfleet.api.smallmodel import SmallModel
from slmfleet.k8s.client import KubeClient
from slmfleet.weights.facts import WeightsFacts
from slmfleet.weights.inspect import inspect_s3, s3_client

RETRY_SECONDS = 30.0
HEALING = frozenset({"StorageUnreachable", "StorageDenied", "CredentialsUnavailable"})


@dataclass
class WeightsReader:
    client: KubeClient
    cache: dict[tuple[str, str, bool], tuple[float, WeightsFacts]] = field(default_factory=dict)
    ca_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="slmfleet-ca-")))

    async def facts(self, body: dict[str, Any]) -> WeightsFacts | None:
        try:
            model = SmallModel.model_validate(body)
        except ValueError:
            return None  # the planner reports the invalid spec
        source = model.spec.source
        if not source.uri.startswith("s3://"):
            return None  # PVC contents are only visible to the pods; the loader checks them there
        key = (source.uri, source.digest, source.allow_pickle)
        cached = self.cache.get(key)
        if cached and (cached[1].problem not in HEALING or time.monotonic() - cached[0] < RETRY_SECONDS):
            return cached[1]
        facts = await self._read(body["metadata"]["namespace"], model)
        if facts.problem in HEALING:
            facts = replace(facts, transient=True)
        self.cache[key] = (time.monotonic(), facts)
        return facts

    async def _read(self, namespace: str, model: SmallModel) -> WeightsFacts:
        source = model.spec.source
        s3 = source.s3
        access_key = secret_key = ca_bundle = None
        if s3 is not None and s3.credentials_secret is not None:
            ref = s3.credentials_secret
            try:
                data = await self.client.read_secret(namespace, ref.name)
                access_key, secret_key = data[ref.access_key_id_key], data[ref.secret_access_key_key]
            except Exception as exc:  # noqa: BLE001 - any failure means: no credentials (yet)
                what = f"key {exc}" if isinstance(exc, KeyError) else getattr(exc, "reason", type(exc).__name__)
                return WeightsFacts(digest=source.digest, problem="CredentialsUnavailable",
                                    message=f"Secret {namespace}/{ref.name}: {what}")
        if s3 is not None and s3.ca_config_map is not None:
            ref_ca = s3.ca_config_map
            try:
                pem = (await self.client.read_config_map(namespace, ref_ca.name))[ref_ca.key]
            except Exception as exc:  # noqa: BLE001
                return WeightsFacts(digest=source.digest, problem="CredentialsUnavailable",
                                    message=f"ConfigMap {namespace}/{ref_ca.name}: CA bundle unavailable ({exc})")
            path = self.ca_dir / (hashlib.sha256(pem.encode()).hexdigest()[:16] + ".pem")
            if not path.exists():
                path.write_text(pem)
            ca_bundle = str(path)
        client = s3_client(
            endpoint_url=s3.endpoint if s3 else None, region=s3.region if s3 else None,
            path_style=s3.path_style if s3 else True, ca_bundle=ca_bundle,
            access_key_id=access_key, secret_access_key=secret_key,
        )
        return await asyncio.to_thread(inspect_s3, client, source.uri, source.digest, allow_pickle=source.allow_pickle)
