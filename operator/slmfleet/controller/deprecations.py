"""The deprecated base models list, kept current from its ConfigMap."""

from __future__ import annotations

import asyncio
import logging

from slmfleet.controller.runtime import DEPRECATIONS_POLL_SECONDS, Runtime
from slmfleet.k8s.client import ObjectRef
from slmfleet.rollout.deprecations import DATA_KEY, DeprecationsError, parse_deprecations

log = logging.getLogger("slmfleet.operator")


async def watch_deprecations(runtime: Runtime) -> None:
    """Keep the deprecated base models list current. It is one object: a GET every few seconds
    needs only `get` on it, where a watch would need `list` on every ConfigMap. Models are not
    reconciled before the first read: a restarted operator must not roll a deprecated model forward."""
    ref = runtime.config.deprecations
    if ref is None:
        runtime.deprecations_ready.set()
        return
    last: str | None = None
    while True:
        try:
            text = (await runtime.client.read_config_map(ref.namespace, ref.name)).get(DATA_KEY, "")
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "status", None) == 404:
                text = ""
            else:
                log.warning("could not read the deprecations ConfigMap %s/%s: %s", ref.namespace, ref.name, exc)
                await asyncio.sleep(DEPRECATIONS_POLL_SECONDS)
                continue
        if text != last:
            try:
                runtime.deprecations = parse_deprecations(text)
                log.info("deprecated base models: %s",
                         ", ".join(d.base_model for d in runtime.deprecations.entries) or "none")
                if runtime.indices is not None:
                    for key in list(runtime.indices["slm_models"]):
                        runtime.queue.add(key)
            except DeprecationsError as exc:
                # Keep the last good list: a typo must not un-deprecate anything. Say so where the
                # platform team looks: `kubectl describe configmap` shows the Event.
                message = f"{exc}; the operator keeps the previous list"
                log.error("%s/%s: %s", ref.namespace, ref.name, message)
                try:
                    await runtime.client.post_event(ObjectRef("v1", "ConfigMap", ref.namespace, ref.name),
                                                    "Warning", "InvalidDeprecations", message)
                except Exception:
                    log.warning("could not post the InvalidDeprecations Event", exc_info=True)
            last = text
            runtime.deprecations_ready.set()
        await asyncio.sleep(DEPRECATIONS_POLL_SECONDS)
