"""What a reconcile sees: the model and what it owns from the indices (with our own writes in
place of what the watch has not brought back yet), its ModelRollout, evaluations and live metrics."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from slmfleet.api import modelrollout
from slmfleet.api.smallmodel import KIND, SmallModel
from slmfleet.builders import ModelOwner, served_model_name
from slmfleet.builders.labels import MODEL_LABEL, REVISION_LABEL
from slmfleet.builders.names import revision_object_name
from slmfleet.builders.traffic import HTTPROUTE_API_VERSION
from slmfleet.controller import metrics
from slmfleet.controller.evaluations import LiveCheck
from slmfleet.controller.runtime import GATEWAY_RECHECK_SECONDS, LIVE_CHECK_SECONDS, ModelKey, Runtime
from slmfleet.planning.common import InvalidSpec
from slmfleet.planning.model import Observed
from slmfleet.planning.rollout import RETRY_ANNOTATION, EvaluationSnapshot, RolloutObserved
from slmfleet.rollout.steps import evaluation_id

log = logging.getLogger("slmfleet.operator")


def observe(runtime: Runtime, key: ModelKey) -> Observed | None:
    indices = runtime.indices
    models = list(indices["slm_models"].get(key, ()))
    if not models:
        return None
    body = runtime.writes.fresh(KIND, key[0], models, key[1])[0]
    return Observed.of(
        body,
        deployments=tuple(runtime.writes.fresh("Deployment", key[0], list(indices["slm_deployments"].get(key, ())), key[1])),
        services=tuple(runtime.writes.fresh("Service", key[0], list(indices["slm_services"].get(key, ())), key[1])),
        pods=tuple(indices["slm_model_pods"].get(key, ())),
        cluster=runtime.cluster,
    )


def rollouts_of(runtime: Runtime, key: ModelKey) -> list[dict[str, Any]]:
    """The ModelRollouts referencing the model, oldest first: the first governs it, others wait."""
    cached = list(runtime.indices["slm_rollouts"].get(key, ()))
    rollouts = runtime.writes.fresh(modelrollout.KIND, key[0], cached)
    rollouts = [r for r in rollouts if (r.get("spec", {}).get("modelRef") or {}).get("name") == key[1]]
    rollouts.sort(key=lambda r: (r["metadata"].get("creationTimestamp") or "", r["metadata"]["name"]))
    return rollouts


def attempt_prefix(rollout: dict[str, Any]) -> str:
    """Background evaluations belong to one attempt of one rollout: a retry starts afresh."""
    meta = rollout["metadata"]
    return f"{meta.get('uid', meta['name'])}/{(meta.get('annotations') or {}).get(RETRY_ANNOTATION, '')}/"


def evaluation_snapshots(runtime: Runtime, rollout: dict[str, Any]) -> dict[str, EvaluationSnapshot]:
    status = rollout.get("status") or {}
    candidate = status.get("candidateRevision")
    if not candidate or runtime.evaluations is None:
        return {}
    prefix = attempt_prefix(rollout)
    out = {}
    for step in range(len((rollout.get("spec") or {}).get("steps") or [])):
        eid = evaluation_id(candidate, step)
        if runtime.evaluations.running(prefix + eid):
            out[eid] = EvaluationSnapshot("running")
        elif (done := runtime.evaluations.outcome(prefix + eid)) is not None:
            age = time.monotonic() - done.finished_at
            out[eid] = EvaluationSnapshot(done.verdict, done.reason, done.result, may_retry=age >= 30.0)
    return out


def ready_pod_urls(runtime: Runtime, pods: tuple[dict[str, Any], ...], revision: str | None) -> list[str]:
    """The URLs of the revision's ready pods that its Deployment runs: the operator sends
    evaluations and scrapes nowhere else (a tenant's own pod with the same labels, or one on the
    host's network, would point them at another address)."""
    urls = []
    for pod in sorted(pods, key=lambda p: p["metadata"].get("name") or ""):
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if revision is not None and ready and status.get("podIP") and pod["metadata"].get("deletionTimestamp") is None \
                and runs_revision(pod, revision):
            urls.append(f"http://{status['podIP']}:{runtime.config.vllm_port}")
    return urls


def runs_revision(pod: dict[str, Any], revision: str) -> bool:
    """Whether the pod is one of the revision's Deployment's: its labels, and a ReplicaSet of that
    Deployment as its controller, and the pod network (not the host's)."""
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    model = labels.get(MODEL_LABEL)
    if labels.get(REVISION_LABEL) != revision or not model or (pod.get("spec") or {}).get("hostNetwork"):
        return False
    prefix = revision_object_name(model, revision) + "-"
    return any(r.get("kind") == "ReplicaSet" and str(r.get("name") or "").startswith(prefix)
               for r in meta.get("ownerReferences") or [] if r.get("controller"))


def served_name(model: SmallModel, body: dict[str, Any]) -> str:
    meta = body["metadata"]
    return served_model_name(ModelOwner(meta["name"], meta["namespace"], meta.get("uid", "")), model.spec)


def live_regression(runtime: Runtime, key: ModelKey, ro: RolloutObserved, obs: Observed) -> str | None:
    """Whether the candidate's live traffic (scraped from its pods) breaches the thresholds, while
    it gets traffic, by the last scrape. The world changes here without an event, so the pods are
    scraped again every LIVE_CHECK_SECONDS, in the background: a pod that does not answer holds
    no worker."""
    rollout = ro.body
    status = rollout.get("status") or {}
    if int(status.get("canaryWeight") or 0) <= 0 or status.get("phase") not in ("Evaluating", "Progressing", "Paused"):
        return None
    parsed, model = ro.rollout, obs.model
    candidate = status.get("candidateRevision")
    if isinstance(parsed, InvalidSpec) or isinstance(model, InvalidSpec) or not candidate:
        return None
    runtime.queue.add_after(key, LIVE_CHECK_SECONDS)
    urls = ready_pod_urls(runtime, obs.pods, candidate)
    if not urls:
        return None  # the step machine sees the candidate without ready replicas
    watch = f"{attempt_prefix(rollout)}{candidate}/step-{status.get('currentStep', 0)}"
    last = runtime.live_reads.result(watch)
    if last is None or time.monotonic() - last[0] >= LIVE_CHECK_SECONDS:
        name, thresholds = served_name(model, obs.body), parsed.spec.evaluation.thresholds
        runtime.live_reads.start(watch, key, lambda: runtime.live.check(watch, urls, name, thresholds),
                                 lambda deadline: LiveCheck("insufficient", 0, None, None,
                                                            f"the candidate pods' /metrics gave no answer within "
                                                            f"{deadline:.0f}s"))
    return last[1].reason if last is not None and last[1].verdict == "fail" else None


async def gateway_api_served(runtime: Runtime) -> bool:
    """Whether the HTTPRoute CRD is installed (checked at most once a minute)."""
    if runtime.gateway_api is not None and time.monotonic() - runtime.gateway_api[1] < GATEWAY_RECHECK_SECONDS:
        return runtime.gateway_api[0]
    try:
        served = await runtime.client.serves(HTTPROUTE_API_VERSION, "httproutes")
    except Exception:
        log.warning("could not check whether the Gateway API is installed", exc_info=True)
        served = runtime.gateway_api[0] if runtime.gateway_api is not None else False
    runtime.gateway_api = (served, time.monotonic())
    return served


async def observe_rollout(runtime: Runtime, key: ModelKey, obs: Observed, rollout: dict[str, Any] | None) -> Observed:
    if rollout is None:
        forget_rollout(runtime, key)
        return obs
    gateway = await gateway_api_served(runtime)
    ro = RolloutObserved.of(rollout, evaluations=evaluation_snapshots(runtime, rollout), gateway_api=gateway)
    ro = dataclasses.replace(ro, live_regression=live_regression(runtime, key, ro, obs))
    route = None
    if gateway and ((rollout.get("spec") or {}).get("traffic") or {}).get("httpRoute"):
        route = await runtime.client.get(HTTPROUTE_API_VERSION, "HTTPRoute", key[0], key[1])
    meta, status = rollout["metadata"], rollout.get("status") or {}
    governing = (meta["namespace"], meta["name"], meta.get("uid", meta["name"]))
    if governing != runtime.governing.get(key):
        forget_rollout(runtime, key)  # another rollout governed the model before this one
    runtime.governing[key] = governing
    # Drop what earlier attempts or candidates of this rollout left behind.
    current = attempt_prefix(rollout) + (status.get("candidateRevision") or "")
    _forget_ids(runtime, f"{governing[2]}/", keep_prefix=current)
    revisions = frozenset(r for r in (status.get("stableRevision"), status.get("candidateRevision")) if r)
    if runtime.series_revisions.get(key) != revisions:  # only when they change: /metrics is walked
        metrics.forget_rollout(governing[0], governing[1], keep_revisions=revisions or frozenset({""}))
        runtime.series_revisions[key] = revisions
    return dataclasses.replace(obs, rollout=ro, route=route)


def forget_rollout(runtime: Runtime, key: ModelKey) -> None:
    """The rollout that governed the model governs it no more (deleted, or the model is): its
    evaluations, live baselines and scrapes, and its /metrics series go."""
    gone = runtime.governing.pop(key, None)
    runtime.series_revisions.pop(key, None)
    if gone is None:
        return
    namespace, name, uid = gone
    _forget_ids(runtime, f"{uid}/")
    metrics.forget_rollout(namespace, name)


def _forget_ids(runtime: Runtime, prefix: str, keep_prefix: str | None = None) -> None:
    """Forget the background work whose id starts with `prefix`, except what starts with `keep_prefix`."""
    def keep(id_: str) -> bool:
        return not id_.startswith(prefix) or (keep_prefix is not None and id_.startswith(keep_prefix))

    if runtime.evaluations is not None:
        runtime.evaluations.forget(keep)
    runtime.live.forget(keep)
    runtime.live_reads.forget(keep)
    runtime.eval_models = {id_: model for id_, model in runtime.eval_models.items() if keep(id_)}
