"""Reading weights facts for S3 sources before planning: credentials from the referenced Secret,
the CA bundle from the referenced ConfigMap, then `slmfleet.weights.inspect` on threads of its
own, in the background (controller.background): a storage endpoint that never answers holds
neither a worker nor the threads the Kubernetes client uses.

Successful reads and refused pickle files are verdicts on the pinned bytes and are kept for good,
per namespace and source settings. What is stored at the URI can be fixed (a manifest written, a
file re-uploaded), so those verdicts are re-read after RECHECK_SECONDS; failures that can heal
(storage unreachable, a Secret not created yet, access denied) after RETRY_SECONDS, so a broken
endpoint is not hammered by every watch event. While a verdict is re-read the last one holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from slmfleet.api.config import S3EndpointRule
from slmfleet.api.smallmodel import SmallModel
from slmfleet.controller.background import BackgroundReads
from slmfleet.controller.s3_access import S3AccessError, s3_client_for
from slmfleet.k8s.client import KubeClient
from slmfleet.weights.facts import WeightsFacts, WeightsReading
from slmfleet.weights.inspect import inspect_s3

RETRY_SECONDS = 30.0
# What is stored at a URI can be fixed (a manifest written, a file re-uploaded): re-read then.
RECHECK_SECONDS = 300.0
# The whole read (manifest, config.json, every safetensors header), past the client's own retries.
READ_DEADLINE_SECONDS = 120.0
READ_THREADS = 8
# A Secret not created or labelled yet heals when someone does; access denied may be granted.
HEALING = frozenset({"StorageUnreachable", "StorageDenied", "CredentialsUnavailable", "CredentialsNotAllowed"})
# Verdicts on the pinned bytes themselves (a pin names exactly these bytes, they cannot change),
# and the allow-list's (the operator's config changes only with a restart).
FINAL = frozenset({None, "PickleRefused", "EndpointNotAllowed"})


class WeightsReader:
    def __init__(self, client: KubeClient, requeue: Callable[[Hashable], None],
                 endpoints: Sequence[S3EndpointRule] = (), deadline_seconds: float = READ_DEADLINE_SECONDS) -> None:
        self.client = client
        self.endpoints = tuple(endpoints)  # the platform's allow-list (OperatorConfig.s3Endpoints)
        self.reads: BackgroundReads[WeightsFacts] = BackgroundReads(requeue, deadline_seconds, "weights read")
        self._threads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="slmfleet-s3")

    def facts(self, namespace: str, model: SmallModel, asker: Hashable) -> WeightsFacts | WeightsReading | None:
        """What is known of the source's weights; a read is started when nothing (or nothing
        recent) is, and `asker` is queued again when it ends."""
        source = model.spec.source
        if not source.uri.startswith("s3://"):
            return None  # PVC contents are only visible to the pods; the loader checks them there
        # Per namespace and settings: another namespace's credentials must not vouch for this one.
        key = f"{namespace}/{source.model_dump_json()}"
        known = self.reads.result(key)
        if known is not None:
            ended, facts = known
            ttl = RETRY_SECONDS if facts.problem in HEALING else RECHECK_SECONDS
            if facts.problem in FINAL or time.monotonic() - ended < ttl:
                return facts
        self.reads.start(key, asker, lambda: self._read(namespace, model),
                         lambda deadline: WeightsFacts(digest=source.digest, problem="StorageUnreachable",
                                                       message=f"the storage gave no answer within {deadline:.0f}s",
                                                       transient=True))
        return known[1] if known is not None else WeightsReading()

    async def _read(self, namespace: str, model: SmallModel) -> WeightsFacts:
        source = model.spec.source
        try:
            client = await s3_client_for(self.client, namespace, source.s3, self.endpoints)
        except S3AccessError as exc:
            return WeightsFacts(digest=source.digest, problem=exc.reason, message=str(exc),
                                transient=exc.reason in HEALING)
        facts = await asyncio.get_running_loop().run_in_executor(
            self._threads, lambda: inspect_s3(client, source.uri, source.digest, allow_pickle=source.allow_pickle))
        return replace(facts, transient=True) if facts.problem in HEALING else facts

    async def close(self) -> None:
        await self.reads.close()
        self._threads.shutdown(wait=False, cancel_futures=True)
