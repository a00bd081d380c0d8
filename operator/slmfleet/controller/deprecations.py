"""The deprecated base models list, kept current from its ConfigMap. It fails safe: a list that
cannot be parsed, or a ConfigMap or key that disappears after a list was read, keeps the previous
list and says so with a Warning Event on the ConfigMap (a deletion must not un-deprecate anything)."""

from __future__ import annotations

import asyncio
import logging

from slmfleet.api.config import ConfigMapRef
from slmfleet.controller.runtime import DEPRECATIONS_POLL_SECONDS, Runtime
from slmfleet.k8s.client import ObjectRef
from slmfleet.rollout.deprecations import DATA_KEY, DeprecationsError, parse_deprecations

log = logging.getLogger("slmfleet.operator")

_GONE = object()  # the ConfigMap or its key is not there


async def watch_deprecations(runtime: Runtime) -> None:
    """Keep the deprecated base models list current. It is one object: a GET every few seconds
    needs only `get` on it, where a watch would need `list` on every ConfigMap. Models are not
    reconciled before the first read: a restarted operator must not roll a deprecated model forward."""
    ref = runtime.config.deprecations
    if ref is None:
        runtime.deprecations_ready.set()
        await asyncio.Event().wait()  # nothing to watch; a task that ended would stop the operator
        return  # not reached (the wait never ends): tells mypy that `ref` is set below
    last: object = None  # what the last read saw: text, _GONE, or None before the first
    while True:
        seen = await _read(runtime, ref)
        if seen is not None and seen != last:
            await _take(runtime, ref, seen)
            last = seen
            runtime.deprecations_ready.set()
        await asyncio.sleep(DEPRECATIONS_POLL_SECONDS)


async def _read(runtime: Runtime, ref: ConfigMapRef) -> object:
    """The list's text, _GONE, or None when the API server could not say."""
    try:
        data = await runtime.client.read_config_map(ref.namespace, ref.name)
    except Exception as exc:  # noqa: BLE001 - whatever the failure, the last list holds until a read succeeds
        if getattr(exc, "status", None) == 404:
            return _GONE
        log.warning("could not read the deprecations ConfigMap %s/%s: %s", ref.namespace, ref.name, exc)
        return None
    return data.get(DATA_KEY, _GONE)


async def _take(runtime: Runtime, ref: ConfigMapRef, seen: object) -> None:
    if seen is _GONE:
        if not runtime.deprecations.entries:
            log.warning("no deprecations ConfigMap %s/%s with key %s: no base model is deprecated",
                        ref.namespace, ref.name, DATA_KEY)
            return
        count = len(runtime.deprecations.entries)
        await _warn(runtime, ref, "DeprecationsMissing",
                    f"the ConfigMap or its key {DATA_KEY} is gone; the operator keeps the previous list "
                    f"({count} deprecated base model{'s' if count != 1 else ''}) until a new one is written")
        return
    assert isinstance(seen, str)
    try:
        runtime.deprecations = parse_deprecations(seen)
    except DeprecationsError as exc:
        # Keep the last good list: a typo must not un-deprecate anything.
        await _warn(runtime, ref, "InvalidDeprecations", f"{exc}; the operator keeps the previous list")
        return
    log.info("deprecated base models: %s", ", ".join(d.base_model for d in runtime.deprecations.entries) or "none")
    for key in list(runtime.indices["slm_models"]):
        runtime.queue.add(key)


async def _warn(runtime: Runtime, ref: ConfigMapRef, reason: str, message: str) -> None:
    """Say so where the platform team looks: `kubectl describe configmap` shows the Event."""
    log.error("%s/%s: %s", ref.namespace, ref.name, message)
    try:
        await runtime.client.post_event(ObjectRef("v1", "ConfigMap", ref.namespace, ref.name),
                                        "Warning", reason, message)
    except Exception:
        log.warning("could not post the %s Event", reason, exc_info=True)
