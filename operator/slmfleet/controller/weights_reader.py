"""Reading weights facts for S3 sources before planning: credentials from the referenced Secret,
the CA bundle from the referenced ConfigMap, then `slmfleet.weights.inspect` in a thread.

Successful reads and refused pickle files are verdicts on the pinned bytes and are cached for good,
per namespace and source settings. What is stored at the URI can be fixed (a manifest written, a
file re-uploaded), so those verdicts are re-read after RECHECK_SECONDS; failures that can heal
(storage unreachable, a Secret not created yet, access denied) after RETRY_SECONDS, so a broken
endpoint is not hammered by every watch event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace

from slmfleet.api.smallmodel import SmallModel
from slmfleet.controller.s3_access import S3AccessError, s3_client_for
from slmfleet.k8s.client import KubeClient
from slmfleet.weights.facts import WeightsFacts
from slmfleet.weights.inspect import inspect_s3

RETRY_SECONDS = 30.0
# What is stored at a URI can be fixed (a manifest written, a file re-uploaded): re-read then.
RECHECK_SECONDS = 300.0
HEALING = frozenset({"StorageUnreachable", "StorageDenied", "CredentialsUnavailable"})
# Verdicts on the pinned bytes themselves: a pin names exactly these bytes, they cannot change.
FINAL = frozenset({None, "PickleRefused"})


@dataclass
class WeightsReader:
    client: KubeClient
    cache: dict[tuple[str, str], tuple[float, WeightsFacts]] = field(default_factory=dict)

    async def facts(self, namespace: str, model: SmallModel) -> WeightsFacts | None:
        source = model.spec.source
        if not source.uri.startswith("s3://"):
            return None  # PVC contents are only visible to the pods; the loader checks them there
        # Per namespace and settings: another namespace's credentials must not vouch for this one.
        key = (namespace, source.model_dump_json())
        cached = self.cache.get(key)
        if cached:
            ttl = RETRY_SECONDS if cached[1].problem in HEALING else RECHECK_SECONDS
            if cached[1].problem in FINAL or time.monotonic() - cached[0] < ttl:
                return cached[1]
        facts = await self._read(namespace, model)
        if facts.problem in HEALING:
            facts = replace(facts, transient=True)
        self.cache[key] = (time.monotonic(), facts)
        return facts

    async def _read(self, namespace: str, model: SmallModel) -> WeightsFacts:
        source = model.spec.source
        try:
            client = await s3_client_for(self.client, namespace, source.s3)
        except S3AccessError as exc:
            return WeightsFacts(digest=source.digest, problem="CredentialsUnavailable", message=str(exc))
        return await asyncio.to_thread(inspect_s3, client, source.uri, source.digest, allow_pickle=source.allow_pickle)
