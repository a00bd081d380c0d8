"""Acting on a plan: applies, deletes, status writes and Events through slmfleet.k8s, and the
evaluations a plan asks for."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar, cast

from slmfleet.api import modelrollout
from slmfleet.api.conditions import Condition, set_condition
from slmfleet.api.smallmodel import GROUP, KIND, VERSION, SmallModelStatus
from slmfleet.api.timestamps import rfc3339
from slmfleet.controller import metrics, reservations
from slmfleet.controller.evaluations import EvaluationOutcome, EvaluationRequest
from slmfleet.controller.observe import attempt_prefix, ready_pod_urls, served_name
from slmfleet.controller.runtime import WEIGHT_FAILURES, ModelKey, Runtime
from slmfleet.evaluation.runner import Endpoint
from slmfleet.k8s.client import ObjectRef
from slmfleet.planning.common import InvalidSpec
from slmfleet.planning.model import Observed, Plan
from slmfleet.planning.rollout import plan_not_governing

log = logging.getLogger("slmfleet.operator")

T = TypeVar("T")


async def report_not_governing(runtime: Runtime, key: ModelKey, rollouts: list[dict[str, Any]],
                               model_exists: bool) -> None:
    """Say so in the status of rollouts that govern nothing, rather than leave them silent."""
    now = dt.datetime.now(dt.UTC)
    for index, rollout in enumerate(rollouts):
        if not model_exists:
            reason, message = "ModelNotFound", f"SmallModel {key[0]}/{key[1]} does not exist"
        elif index > 0:
            reason, message = "Conflict", (f"SmallModel {key[1]} is governed by ModelRollout "
                                           f"{rollouts[0]['metadata']['name']} (the oldest referencing it)")
        else:
            continue
        status = plan_not_governing(rollout, reason, message, now)
        if status is not None:
            runtime.writes.remember(rollout, await runtime.client.patch_status(_rollout_ref(rollout), status))
            metrics.API_WRITES.labels("status").inc()
            await runtime.client.post_event(_rollout_ref(rollout), "Warning", reason, message)


class ForeignObject(Exception):
    """An object the plan would apply exists and is not the model's: the operator leaves it alone."""

    def __init__(self, api_version: str, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name}")
        self.api_version, self.kind, self.name = api_version, kind, name


def owned_by(obj: dict[str, Any] | None, uid: str) -> bool:
    """Whether the model (by uid) is the object's controller."""
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


async def _refuse_foreign(runtime: Runtime, model: ObjectRef, obj: dict[str, Any], seen: dict[str, Any] | None) -> None:
    """Raise ForeignObject unless the object is new or already the model's. One the watches have
    not shown is read first: a Service or HTTPRoute of the same name may belong to someone else
    (forced server-side apply would take it over, and the model's deletion would delete it)."""
    current = seen
    if current is None:
        current = await runtime.client.get(obj["apiVersion"], obj["kind"], model.namespace, obj["metadata"]["name"])
    if current is not None and not owned_by(current, model.uid):
        raise ForeignObject(obj["apiVersion"], obj["kind"], obj["metadata"]["name"])


def _rollout_ref(rollout: dict[str, Any]) -> ObjectRef:
    meta = rollout["metadata"]
    return ObjectRef(f"{GROUP}/{VERSION}", modelrollout.KIND, meta["namespace"], meta["name"], meta.get("uid", ""))


async def execute(runtime: Runtime, obs: Observed, plan: Plan) -> None:
    meta = obs.body["metadata"]
    ref = ObjectRef(f"{GROUP}/{VERSION}", KIND, meta["namespace"], meta["name"], meta.get("uid", ""))
    rp = plan.rollout
    rollout = obs.rollout.body if obs.rollout is not None else None
    rollout_written = False
    if rp is not None and rollout is not None and rp.failed and rp.status is not None:
        # A rollback is recorded before its effect: a crash in between must not forget it.
        runtime.writes.remember(rollout, await runtime.client.patch_status(_rollout_ref(rollout), rp.status))
        metrics.API_WRITES.labels("status").inc()
        rollout_written = True
    live = {(o["kind"], o["metadata"]["name"]): o for o in (*obs.deployments, *obs.services)}
    if obs.route is not None:
        live[("HTTPRoute", obs.route["metadata"]["name"])] = obs.route
    planned = [obj for obj in plan.apply if obj["kind"] == "Deployment"]
    if planned:  # before the first await: another worker may be planning meanwhile
        reservations.refresh(runtime, (ref.namespace, ref.name), planned)
    try:
        # All of them checked first: nothing of the model's goes up beside a foreign object. The
        # objects are independent of each other, so the checks and then the applies go out at
        # once: a new model waits for two round trips, not for six.
        await _all(_refuse_foreign(runtime, ref, obj, live.get((obj["kind"], obj["metadata"]["name"])))
                   for obj in plan.apply)
        for obj, applied in zip(plan.apply, await _all(runtime.client.apply(obj) for obj in plan.apply), strict=True):
            if obj["kind"] != "HTTPRoute":  # routes are read fresh, not cached
                runtime.writes.remember(live.get((obj["kind"], obj["metadata"]["name"])), applied)
            metrics.API_WRITES.labels("apply").inc()
            log.info("applied %s %s/%s", obj["kind"], ref.namespace, obj["metadata"]["name"])
    finally:
        if planned:  # what was applied, before the watch brings it back; nothing of a failed apply
            reservations.refresh(runtime, (ref.namespace, ref.name))
    # The status says which revision serves before the replaced one is deleted, so that nobody
    # reading the status sees a serving revision without its Deployment.
    if plan.status is not None:
        runtime.writes.remember(obs.body, await runtime.client.patch_status(ref, plan.status))
        metrics.API_WRITES.labels("status").inc()
    for gone in plan.delete:
        await runtime.client.delete(ObjectRef(gone.api_version, gone.kind, ref.namespace, gone.name, gone.uid))
        runtime.writes.deleted.add((gone.kind, ref.namespace, gone.name, gone.uid, ref.name))
        runtime.writes.forget(gone.kind, ref.namespace, gone.name)
        metrics.API_WRITES.labels("delete").inc()
        log.info("deleted %s %s/%s", gone.kind, ref.namespace, gone.name)
    if rp is not None and rollout is not None and rp.status is not None and not rollout_written:
        runtime.writes.remember(rollout, await runtime.client.patch_status(_rollout_ref(rollout), rp.status))
        metrics.API_WRITES.labels("status").inc()
    for event in plan.events:
        if event.reason in WEIGHT_FAILURES:
            metrics.WEIGHT_VERIFICATION_FAILURES.labels(event.reason).inc()
    await _post_events(runtime, ref, plan.events)
    if rp is None or rollout is None:
        return
    rref = _rollout_ref(rollout)
    await _post_events(runtime, rref, rp.events)
    metrics.CANARY_WEIGHT.labels(rref.namespace, rref.name).set(rp.weight if rp.governed else 0)
    if rp.rollback_reason:
        metrics.ROLLBACKS.labels(rref.namespace, rref.name, rp.rollback_reason).inc()
    if rp.promoted and any(e.reason == "Promoted" for e in rp.events):
        metrics.PROMOTIONS.labels(rref.namespace, rref.name).inc()
    if rp.start is not None:
        start_evaluation(runtime, obs, plan, rollout)


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """The calls at once; every one ends before this returns (or raises the first failure), so
    that no request of a reconcile is still in flight when the next reconcile of the model starts."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)


async def _post_events(runtime: Runtime, ref: ObjectRef, events: Any) -> None:
    """The Events, sent at once (each carries its own time, so their order is kept)."""
    await _all(runtime.client.post_event(ref, e.type, e.reason, e.message) for e in events)
    for event in events:
        metrics.API_WRITES.labels("event").inc()
        log.info("%s/%s %s: %s", ref.namespace, ref.name, event.reason, event.message)


def start_evaluation(runtime: Runtime, obs: Observed, plan: Plan, rollout: dict[str, Any]) -> None:
    """Ensure the evaluation the plan asks for runs (the same id twice is one evaluation)."""
    rp = plan.rollout
    assert rp is not None and rp.start is not None and rp.spec is not None and runtime.evaluations is not None
    status = plan.status or obs.body.get("status") or {}
    stable, candidate = status.get("servingRevision"), status.get("revision")
    stable_urls = ready_pod_urls(runtime, obs.pods, stable)
    candidate_urls = ready_pod_urls(runtime, obs.pods, candidate)
    key = (obs.body["metadata"]["namespace"], obs.body["metadata"]["name"])
    if not stable_urls or not candidate_urls:
        runtime.queue.add_after(key, 2.0)  # the pods' IPs are not in the cache yet
        return
    meta = rollout["metadata"]
    if stable is None or candidate is None or isinstance(obs.model, InvalidSpec):
        return  # no revisions to compare yet; the next reconcile looks again
    name = served_name(obs.model, obs.body)
    request = EvaluationRequest(
        id=attempt_prefix(rollout) + rp.start.evaluation_id, namespace=meta["namespace"], rollout=meta["name"],
        rollout_uid=meta.get("uid", ""), step=rp.start.step, evaluation=rp.spec.evaluation,
        sample_size=rp.start.sample_size or rp.spec.evaluation.sample_size,
        stable=Endpoint(stable_urls[0], name), candidate=Endpoint(candidate_urls[0], name),
        stable_revision=stable, candidate_revision=candidate)
    runtime.eval_models[request.id] = key
    runtime.evaluations.ensure(request)


def evaluation_done(runtime: Runtime, request: EvaluationRequest, outcome: EvaluationOutcome) -> None:
    """A background evaluation ended: record its scores in /metrics and look at the model again."""
    metrics.EVALUATION_VERDICTS.labels(request.namespace, request.rollout, outcome.verdict).inc()
    revisions = {"stable": request.stable_revision, "candidate": request.candidate_revision}
    for role, scores in outcome.scores.items():
        for scorer, value in scores.items():
            metrics.EVALUATION_SCORE.labels(request.namespace, request.rollout, role, revisions.get(role, ""),
                                            scorer).set(value)
    key = runtime.eval_models.get(request.id)
    if key is not None:
        runtime.queue.add(key)


async def _report_failure(runtime: Runtime, body: dict[str, Any], exc: BaseException | None) -> None:
    """Say in the status that reconciling keeps failing, rather than failing silently in a log."""
    meta = body["metadata"]
    old = SmallModelStatus.model_validate(body.get("status") or {})
    now = rfc3339(dt.datetime.now(dt.UTC))
    message = f"reconciling keeps failing ({type(exc).__name__}: {exc}); the operator retries with back-off"
    cond = Condition(type="Degraded", status="True", reason="ReconcileError", message=message[:1000],
                     observed_generation=meta.get("generation"))
    status = old.model_copy(update={"conditions": set_condition(old.conditions, cond, now)}).to_wire()
    ref = ObjectRef(f"{GROUP}/{VERSION}", KIND, meta["namespace"], meta["name"], meta.get("uid", ""))
    try:
        await runtime.client.patch_status(ref, status)
        await runtime.client.post_event(ref, "Warning", "ReconcileError", message)
    except Exception:  # noqa: BLE001 - the log already has the original failure
        log.warning("could not report the failure in %s/%s's status", ref.namespace, ref.name)
