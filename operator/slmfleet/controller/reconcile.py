"""One reconcile of one model: observe, plan (slmfleet.planning), execute; retries with back-off."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import sys
import time

from slmfleet.api.smallmodel import KIND
from slmfleet.controller import metrics
from slmfleet.controller.execute import ForeignObject, _report_failure, execute, owned_by, report_not_governing
from slmfleet.controller.observe import forget_rollout, observe, observe_rollout, rollouts_of
from slmfleet.controller.runtime import REPORT_AFTER_FAILURES, RETRY_SECONDS, ModelKey, Runtime
from slmfleet.planning.common import InvalidSpec
from slmfleet.planning.deprecation import served_model
from slmfleet.planning.model import Observed, plan_model

log = logging.getLogger("slmfleet.operator")


async def still_in_conflict(runtime: Runtime, key: ModelKey, obs: Observed) -> str | None:
    """The object of another owner the model's names collide with, if it is still there. Foreign
    objects are not watched: the plan looks again regularly."""
    found = runtime.conflicts.get(key)
    if found is None:
        return None
    api_version, kind, name = found
    current = await runtime.client.get(api_version, kind, key[0], name)
    if current is None or owned_by(current, obs.body["metadata"].get("uid", "")):
        runtime.conflicts.pop(key, None)
        return None
    return f"{kind} {name}"


async def reconcile(runtime: Runtime, key: ModelKey) -> None:
    started = time.monotonic()
    obs = observe(runtime, key)
    rollouts = rollouts_of(runtime, key)
    if obs is None:  # deleted: owner references let the garbage collector remove what it owned
        runtime.conditions.pop(key, None)
        runtime.conflicts.pop(key, None)
        forget_rollout(runtime, key)
        runtime.gpus.pop(key, None)
        try:
            await report_not_governing(runtime, key, rollouts, model_exists=False)
        except Exception:
            log.warning("could not report on the rollouts of %s/%s", *key, exc_info=True)
        return
    try:
        await report_not_governing(runtime, key, rollouts, model_exists=True)
        now = dt.datetime.now(dt.UTC)
        obs = dataclasses.replace(obs, deprecations=runtime.deprecations)
        if runtime.weights is not None and not isinstance(obs.model, InvalidSpec):
            # The weights of what is to be served: a deprecated base falls back to another digest.
            served = served_model(obs.model, runtime.deprecations, now)
            obs = dataclasses.replace(obs, weights=runtime.weights.facts(key[0], served, key))
        obs = await observe_rollout(runtime, key, obs, rollouts[0] if rollouts else None)
        obs = dataclasses.replace(obs, conflict=await still_in_conflict(runtime, key, obs))
        plan = plan_model(obs, runtime.config, now)
        await execute(runtime, obs, plan)
    except ForeignObject as exc:
        # Planned again at once, knowing: the model says Degraded/Conflict and applies nothing.
        log.warning("%s/%s: %s exists and is not this SmallModel's; leaving it untouched", *key, exc)
        runtime.conflicts[key] = (exc.api_version, exc.kind, exc.name)
        runtime.queue.add_after(key, 0.1)
        return
    except Exception:
        attempt = runtime.failures.get(key, 0)
        runtime.failures[key] = attempt + 1
        delay = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
        log.exception("reconcile of %s/%s failed (attempt %d); retrying in %ss", *key, attempt + 1, delay)
        metrics.RECONCILES.labels(KIND, "error").inc()
        runtime.queue.add_after(key, delay)
        if attempt + 1 == REPORT_AFTER_FAILURES:
            await _report_failure(runtime, obs.body, sys.exc_info()[1])
        return
    finally:
        metrics.RECONCILE_SECONDS.labels(KIND).observe(time.monotonic() - started)
    runtime.failures.pop(key, None)
    runtime.conditions[key] = plan.conditions
    runtime.gpus[key] = plan.gpus
    metrics.RECONCILES.labels(KIND, "changed" if plan.writes else "noop").inc()
    if plan.requeue_after is not None:
        runtime.queue.add_after(key, plan.requeue_after)
