"""What a ModelRollout decides for its model this time, as data (the plan half, like model_plan).

`plan_rollout` runs the step machine (rollout.steps.next_action) as far as it can go without
waiting: every action it takes is an effect the model's plan implements at once (a weight, a
promotion, a rollback), so one reconcile may go through several steps, and the status it returns
records where it ended. Evaluations are the one effect that takes time: the plan names the one to
start, the operator runs it in the background and shows its outcome to the next plan.

All the rollout's state is in the ModelRollout status (`RolloutState.to_status`), so a restarted
operator resumes where the status says; the verdicts of finished evaluations are in
`status.evaluations`, so none is lost either.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import ValidationError

from slmfleet.api.conditions import Condition, set_condition
from slmfleet.api.modelrollout import (
    EvaluationResult,
    HttpRouteTraffic,
    ModelRollout,
    ModelRolloutSpec,
    ModelRolloutStatus,
)
from slmfleet.api.smallmodel import RevisionRecord
from slmfleet.api.timestamps import rfc3339
from slmfleet.builders.owner import ModelOwner
from slmfleet.builders.service import canary_weight_of
from slmfleet.builders.traffic import replica_ratio_replicas, route_weight_of
from slmfleet.planning.common import EventNote, InvalidSpec, validation_message
from slmfleet.rollout.steps import (
    FINAL_PHASES,
    Advance,
    EvaluationObservation,
    Observations,
    Promote,
    Rollback,
    RolloutState,
    SetWeight,
    StartEvaluation,
    Wait,
    evaluation_id,
    next_action,
)

RETRY_ANNOTATION = "slmfleet.io/retry"
MAX_ACTIONS = 64  # more than any spec's steps: the machine never loops, this only bounds a bug


@dataclass(frozen=True)
class EvaluationSnapshot:
    """What the operator's background evaluations know of one evaluation (by its id)."""

    state: Literal["running", "pass", "fail", "error"]
    reason: str = ""
    result: dict[str, Any] | None = None  # EvaluationResult on the wire, for pass / fail
    may_retry: bool = False  # an error old enough to start it again


@dataclass(frozen=True)
class RolloutObserved:
    body: dict[str, Any]  # the ModelRollout
    rollout: ModelRollout | InvalidSpec  # the body, parsed once
    # By evaluation id, of the current attempt only: the operator keys its background evaluations by
    # the retry annotation's value too, so a retried rollout sees none of the last attempt's.
    evaluations: Mapping[str, EvaluationSnapshot] = field(default_factory=dict)
    live_regression: str | None = None  # the candidate's live p95 / error rate breaches a threshold
    gateway_api: bool = False  # the HTTPRoute CRD is served

    @classmethod
    def of(cls, body: dict[str, Any], **observed: Any) -> RolloutObserved:
        parsed, invalid = parse_rollout(body)
        return cls(body, parsed if parsed is not None else InvalidSpec(invalid), **observed)


@dataclass(frozen=True)
class RolloutInputs:
    """What the model's plan tells the rollout's: the two revisions and how the candidate does."""

    owner: ModelOwner
    stable: str | None  # the revision serving now (None: nothing serves yet)
    candidate: str  # the model's desired revision; equal to `stable` when there is nothing to roll out
    replicas: int
    history: tuple[RevisionRecord, ...]
    # The live objects that carry the weight: it is read back from them, so a weight applied
    # before its status write was lost is recognised, not applied again.
    model_service: dict[str, Any] | None
    route: dict[str, Any] | None
    now: dt.datetime
    candidate_ready: bool = False
    candidate_failure: str | None = None  # why the candidate cannot serve, for good
    base_deprecated: str | None = None  # the deprecation's message
    # Why the candidate cannot be placed or scheduled, if it cannot: the rollout waits for it (it
    # proceeds on its own when capacity frees) and says so.
    candidate_unschedulable: str | None = None


@dataclass(frozen=True)
class RolloutPlan:
    status: dict[str, Any] | None = None  # the ModelRollout status to write; None: unchanged
    events: tuple[EventNote, ...] = ()  # on the ModelRollout
    governed: bool = False  # a candidate is being rolled out (or was, and is held at 0)
    weight: int = 0  # canary weight to implement
    candidate_replicas: int = 0
    traffic: HttpRouteTraffic | None = None  # weights go to this HTTPRoute (None: the replica ratio)
    start: StartEvaluation | None = None
    promoted: bool = False
    failed: str | None = None  # why the candidate was rolled back or refused (final)
    requeue_after: float | None = None
    phase: str | None = None
    rollback_reason: str | None = None  # a rollback decided this time, by kind (for metrics)
    spec: ModelRolloutSpec | None = None  # the rollout's spec, parsed (None: invalid)


_ROLLBACK_KINDS = (
    ("the candidate's base model is deprecated", "BaseModelDeprecated"),
    ("the candidate revision cannot serve", "CandidateFailed"),
    ("live metrics regressed", "LiveMetrics"),
    ("the candidate has no ready replica", "CandidateNotReady"),
    ("evaluation at step", "EvaluationFailed"),
)


def rollback_kind(reason: str) -> str:
    return next((kind for prefix, kind in _ROLLBACK_KINDS if reason.startswith(prefix)), "Other")


def parse_rollout(body: Mapping[str, Any]) -> tuple[ModelRollout | None, str]:
    try:
        return ModelRollout.model_validate(dict(body)), ""
    except ValidationError as exc:
        return None, validation_message(exc)


def _conditions(old: list[Condition], phase: str | None, message: str, generation: int, now: dt.datetime,
                degraded_reason: str | None = None) -> list[Condition]:
    moving = phase in ("Pending", "Evaluating", "Progressing", "Paused")
    failed = phase in ("RolledBack", "Failed") or degraded_reason is not None
    conds = list(old)
    stamp = rfc3339(now)
    for type_, status, reason in (
        ("Ready", not moving and not failed, phase or "Idle"),
        ("Progressing", moving, phase or "Idle"),
        ("Degraded", failed, degraded_reason or (phase if failed else "AsExpected")),
    ):
        conds = set_condition(conds, Condition(type=type_, status="True" if status else "False", reason=reason,
                                               message=message[:2000], observed_generation=generation), stamp)
    return conds


def _verdict_of(result: Mapping[str, Any]) -> str:
    return "pass" if result.get("verdict") == "Pass" else "fail"


def plan_rollout(ro: RolloutObserved, inputs: RolloutInputs) -> RolloutPlan:
    """The rollout's plan for its model's two revisions, as far as the step machine goes now."""
    meta = ro.body.get("metadata") or {}
    generation = int(meta.get("generation", 1))
    now = inputs.now
    if isinstance(ro.rollout, InvalidSpec):
        raw_status = ro.body.get("status") if isinstance(ro.body.get("status"), dict) else {}
        invalid = ro.rollout.message
        old = ModelRolloutStatus.model_validate(raw_status or {})
        conds = _conditions(list(old.conditions), None, invalid, generation, now, "InvalidSpec")
        new = old.model_copy(update={"observed_generation": generation, "conditions": conds, "message": invalid})
        # Said once, when the status starts saying it: not on every reconcile of an unchanged spec.
        said = new.to_wire() == old.to_wire()
        return _finish(old, new, [] if said else [EventNote("Warning", "InvalidSpec", invalid)], RolloutPlan())
    rollout = ro.rollout
    traffic = rollout.spec.traffic.http_route if ro.gateway_api else None
    if inputs.stable is None or inputs.candidate == inputs.stable:
        return _idle(ro, rollout, rollout.status, inputs.stable, inputs.candidate, generation, now, traffic,
                     inputs.base_deprecated)
    run = _resume(ro, rollout, inputs)
    _run_steps(run, ro, rollout, inputs, traffic)
    return _governed_plan(run, ro, rollout, inputs, traffic, generation)


@dataclass
class _Run:
    """One pass of the step machine over a rollout in flight: where it started, where it is, and
    what it recorded on the way."""

    state: RolloutState
    before: RolloutState  # where the status left it
    fresh: bool  # the status is about another candidate (or none): a new rollout
    retry: str | None  # the retry annotation's value
    evaluations: list[EvaluationResult]
    events: list[EventNote] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # evaluations that could not run
    message: str = ""
    start: StartEvaluation | None = None
    requeue: float | None = None
    promoted: bool = False
    rollback_reason: str | None = None


def _resume(ro: RolloutObserved, rollout: ModelRollout, inputs: RolloutInputs) -> _Run:
    """Where the status says the rollout of this candidate is; a new value of the retry annotation
    starts a failed (or new) rollout afresh, and a candidate rolled back before stays rolled back."""
    old, candidate = rollout.status, inputs.candidate
    raw_status = ro.body.get("status") if isinstance(ro.body.get("status"), dict) else None
    fresh = old.candidate_revision != candidate
    state = RolloutState.from_status(None if fresh else raw_status, revision=candidate)
    evaluations = [] if fresh else list(old.evaluations)
    events: list[EventNote] = []
    retry = ((ro.body.get("metadata") or {}).get("annotations") or {}).get(RETRY_ANNOTATION)
    if retry and retry != old.retry and (state.phase in ("RolledBack", "Failed") or fresh):
        if not fresh:
            events.append(EventNote("Normal", "Retry", f"{RETRY_ANNOTATION}={retry}: rolling revision {candidate} out again"))
        state, evaluations, fresh = RolloutState(revision=candidate), [], False
    elif fresh and any(h.revision == candidate and h.outcome == "RolledBack" for h in inputs.history):
        state = RolloutState(phase="RolledBack", revision=candidate,
                             reason=f"revision {candidate} was rolled back before; set the {RETRY_ANNOTATION} "
                                    "annotation to a new value to roll it out again")
    return _Run(state=state, before=state, fresh=fresh, retry=retry, evaluations=evaluations, events=events)


def _observe_evaluation(run: _Run, ro: RolloutObserved) -> tuple[EvaluationObservation | None, float | None]:
    """The evaluation of the current step as the machine sees it: recorded in the status, just
    finished in the background (then recorded now), running, or unable to run."""
    current = run.state
    eid = evaluation_id(current.revision, current.step)
    recorded = next((e for e in run.evaluations if e.step == current.step), None)
    if recorded is not None:
        return EvaluationObservation(eid, "pass" if recorded.verdict == "Pass" else "fail", recorded.reason), None
    snap = ro.evaluations.get(eid)
    if snap is None:
        return None, None
    if snap.state in ("pass", "fail") and snap.result is not None:
        result = EvaluationResult.model_validate({**snap.result, "step": current.step})
        run.evaluations.append(result)
        kind, reason = ("Normal", "EvaluationPassed") if snap.state == "pass" else ("Warning", "EvaluationFailed")
        run.events.append(EventNote(kind, reason, f"step {current.step}: candidate {result.candidate_score} vs stable "
                                                  f"{result.stable_score} on {result.n} cases: {result.reason}"))
        return EvaluationObservation(eid, snap.state, snap.reason), None
    if snap.state == "error":
        run.notes.append(f"evaluation {eid} could not run: {snap.reason}")
        return (None, None) if snap.may_retry else (EvaluationObservation(eid, None), 30.0)
    return EvaluationObservation(eid, None), None


def _run_steps(run: _Run, ro: RolloutObserved, rollout: ModelRollout, inputs: RolloutInputs,
               traffic: HttpRouteTraffic | None) -> None:
    """Take the machine's actions until one waits: weights and step starts go on at once (the
    model's plan implements them in the same reconcile); an evaluation, a promotion, a rollback or
    a pause ends the pass."""
    candidate = inputs.candidate
    applied = (route_weight_of(inputs.route, inputs.owner, candidate) if traffic
               else canary_weight_of(inputs.model_service, candidate))
    before = run.before
    for _ in range(MAX_ACTIONS):
        seen, retry_in = _observe_evaluation(run, ro)
        obs = Observations(candidate_ready=inputs.candidate_ready, evaluation=seen, live_regression=ro.live_regression,
                           candidate_failure=inputs.candidate_failure, base_deprecated=inputs.base_deprecated,
                           applied_weight=applied, promoted=False)
        action = next_action(rollout.spec.steps, run.state, obs, inputs.now)
        run.message = action.message
        if isinstance(action, (Advance, SetWeight)):
            run.events.append(EventNote("Normal", "CanaryWeight" if isinstance(action, SetWeight) else "StepStarted",
                                        action.message))
            if isinstance(action, SetWeight):
                applied = action.weight
            run.state = action.state
            continue
        if isinstance(action, StartEvaluation):
            run.start = action
            if (before.phase, before.step) != (action.state.phase, action.state.step) or run.fresh:
                run.events.append(EventNote("Normal", "EvaluationStarted", action.message))
        elif isinstance(action, Promote):
            run.promoted = True
            if before.phase != "Promoted":
                run.events.append(EventNote("Normal", "Promoted", action.message))
        elif isinstance(action, Rollback):
            if before.phase not in FINAL_PHASES:
                run.rollback_reason = rollback_kind(action.reason)
            if before.phase not in FINAL_PHASES or before.weight != 0:
                run.events.append(EventNote("Warning", "RolledBack" if action.state.phase == "RolledBack" else "Failed",
                                            action.message))
        elif isinstance(action, Wait):
            run.requeue = max(0.5, (action.until - inputs.now).total_seconds())
        run.state = action.state
        run.requeue = retry_in if run.requeue is None else run.requeue
        return


def _candidate_replicas(state: RolloutState, replicas: int, traffic: HttpRouteTraffic | None) -> int:
    """Promoted: all of them; rolled back: none; by route: at least one to take the route's share;
    by the replica ratio: the share of the replicas the weight asks for."""
    if state.phase == "Promoted":
        return replicas
    if state.phase in ("RolledBack", "Failed"):
        return 0
    if traffic:
        return max(replicas, 1)
    return replica_ratio_replicas(replicas, state.weight)


def _governed_plan(run: _Run, ro: RolloutObserved, rollout: ModelRollout, inputs: RolloutInputs,
                   traffic: HttpRouteTraffic | None, generation: int) -> RolloutPlan:
    """The plan and status of a rollout in flight, from where the pass ended."""
    old, state, now = rollout.status, run.state, inputs.now
    failed = state.reason if state.phase in ("RolledBack", "Failed") else None
    mode_note = ""
    if rollout.spec.traffic.http_route is not None and traffic is None:
        mode_note = " (traffic.httpRoute is set but the Gateway API CRDs are not installed: using the replica ratio)"
    text = (failed or run.message) + ("; " + "; ".join(run.notes) if run.notes else "") + mode_note
    degraded_reason = None
    if failed and inputs.base_deprecated:
        degraded_reason = "BaseModelDeprecated"
    elif run.notes and not failed:
        degraded_reason = "EvaluationError"  # it cannot run (dataset, stable): held, retried, not rolled back
    conditions = _conditions(list(old.conditions), state.phase, text, generation, now, degraded_reason)
    if inputs.candidate_unschedulable and state.phase == "Pending" and not inputs.candidate_ready:
        text = f"the candidate revision {inputs.candidate} cannot be placed yet: {inputs.candidate_unschedulable}"
        conditions = set_condition(conditions, Condition(
            type="Progressing", status="False", reason="CandidateUnschedulable", message=text[:2000],
            observed_generation=generation), rfc3339(now))
        said = next((c for c in old.conditions if c.type == "Progressing"), None)
        if said is None or said.reason != "CandidateUnschedulable":
            run.events.append(EventNote("Warning", "CandidateUnschedulable", text[:1000]))
    new = old.model_copy(update={
        **_state_fields(state),
        "observed_generation": generation,
        "stable_revision": inputs.stable,
        "evaluations": run.evaluations[-64:],
        "message": text[:4000],
        "retry": run.retry if run.retry else old.retry,
        "conditions": conditions,
    })
    plan = RolloutPlan(governed=True, weight=0 if failed else state.weight,
                       candidate_replicas=_candidate_replicas(state, inputs.replicas, traffic),
                       traffic=traffic, start=run.start, promoted=run.promoted, failed=failed,
                       requeue_after=run.requeue, phase=state.phase, rollback_reason=run.rollback_reason,
                       spec=rollout.spec)
    return _finish(old, new, run.events, plan)


def _state_fields(state: RolloutState) -> dict[str, Any]:
    wire = state.to_status()
    return {
        "phase": wire["phase"],
        "current_step": wire["currentStep"],
        "canary_weight": wire["canaryWeight"],
        "step_started_at": wire.get("stepStartedAt"),
        "candidate_revision": wire.get("candidateRevision"),
    }


def _idle(ro: RolloutObserved, rollout: ModelRollout, old: ModelRolloutStatus, stable: str | None, desired: str,
          generation: int, now: dt.datetime, traffic: HttpRouteTraffic | None,
          base_deprecated: str | None) -> RolloutPlan:
    """Nothing to roll out: the model serves its desired revision (or nothing serves yet). The
    status keeps describing the last rollout; only one still in flight is settled here."""
    events: list[EventNote] = []
    update: dict[str, Any] = {"observed_generation": generation, "stable_revision": stable}
    phase = old.phase
    if stable is None:
        message = f"waiting for the first revision ({desired}) to serve; it is deployed without a canary"
    elif old.candidate_revision == stable and phase != "Promoted":
        # Promoted in the model, but the rollout's own status write was lost: record it.
        state = RolloutState.from_status(ro.body.get("status"), revision=stable)
        phase = "Promoted"
        update |= _state_fields(replace(state, phase=phase, step=len(rollout.spec.steps), weight=100,
                                        step_started=now, reason=""))
        message = f"revision {stable} was promoted"
        events.append(EventNote("Normal", "Promoted", message))
    elif old.candidate_revision and old.candidate_revision != stable and phase not in FINAL_PHASES:
        phase = "RolledBack"
        update |= {"phase": phase, "canary_weight": 0}
        message = (f"the model's desired revision is {desired} again: the rollout of "
                   f"{old.candidate_revision} was abandoned")
        events.append(EventNote("Warning", "Abandoned", message))
    elif phase == "Promoted":
        message = f"revision {stable} is stable (promoted)"
    elif phase in ("RolledBack", "Failed"):
        message = old.message or f"revision {stable} is stable"
    else:
        message = f"revision {stable} is stable; a change of the model's digest or serving config starts a rollout"
    if base_deprecated:
        message = base_deprecated
    # Idle is healthy, whatever the last rollout's verdict (its candidate is gone): only a
    # deprecated base degrades it. A promotion keeps reading as Ready/Promoted.
    update |= {"message": message[:4000],
               "conditions": _conditions(list(old.conditions), "Promoted" if phase == "Promoted" else None, message,
                                         generation, now, "BaseModelDeprecated" if base_deprecated else None)}
    new = old.model_copy(update=update)
    return _finish(old, new, events, RolloutPlan(governed=False, traffic=traffic, phase=phase, spec=rollout.spec))


def _finish(old: ModelRolloutStatus, new: ModelRolloutStatus, events: list[EventNote], plan: RolloutPlan) -> RolloutPlan:
    old_wire, new_wire = old.to_wire(), new.to_wire()
    return replace(plan, status=new_wire if new_wire != old_wire else None, events=tuple(events))


def plan_not_governing(body: Mapping[str, Any], reason: str, message: str, now: dt.datetime) -> dict[str, Any] | None:
    """The status of a ModelRollout that governs nothing (its model does not exist, or another
    rollout governs it): Degraded with the reason, nothing else touched. None: already says so."""
    rollout, _ = parse_rollout(body)
    raw = body.get("status") if isinstance(body.get("status"), dict) else {}
    old = rollout.status if rollout is not None else ModelRolloutStatus.model_validate(raw or {})
    generation = int((body.get("metadata") or {}).get("generation", 1))
    conds = _conditions(list(old.conditions), None, message, generation, now, reason)
    new = old.model_copy(update={"observed_generation": generation, "message": message, "conditions": conds})
    return new.to_wire() if new.to_wire() != old.to_wire() else None
