"""The rollout's step state machine: what to do next, from the spec's steps, the state kept in
status, what was observed, and the time (passed in). Pure: no I/O, no clock.

    action = next_action(steps, state, observations, now)

Each action says what to do (start an evaluation, set a weight, wait, promote, roll back, nothing)
and carries `state`, the state to record in status once it is done. The handler performs the
action's effect, writes `action.state`, and asks again until the answer is `Wait` or `Nothing`.

Restart safety and idempotence, by construction:
- Everything the machine needs is in `RolloutState` (phase, step, weight, when the step started,
  the candidate revision, the reason of a rollback): `to_status` / `from_status` map it onto the
  ModelRollout status, so a restarted operator resumes exactly where the status says.
- Same inputs, same action (no clock, no randomness). Every effect is idempotent: setting a weight
  that is already set changes nothing, an evaluation is identified by `evaluation_id(revision,
  step)` so starting it twice is one evaluation, a rollback to weight 0 repeated is a no-op.
- A crash between an effect and its status write replays the same action, or, when the cluster
  shows the effect already happened (`observations.applied_weight` equals the step's weight), just
  records it and moves on, so no weight step is applied twice.
- The step index never decreases; Promoted, RolledBack and Failed are final. Their effects are
  re-asserted when the observations show them missing (traffic on a rolled-back candidate;
  `observations.promoted` False in Promoted), and recorded when they show them done before the
  status said so (`observations.promoted` True), so for these two the handler may write status
  before the effect (safest: a rollback decided on a transient regression is not forgotten in a
  crash) or after it; both converge.

Precedence, at every step: a deprecated base model or a broken candidate -> Rollback (phase
Failed); a live p95/error-rate regression, or no ready candidate replica, while the candidate gets
traffic -> Rollback (RolledBack); a failed evaluation -> Rollback (RolledBack); a weight in the
cluster that differs from status -> record it (the step's own weight, applied before a lost status
write) or re-apply status's; then the step's own logic. All steps done -> Promote.

Evaluations are ensured, not fired and forgotten: at an evaluate step without a verdict for its
id, the answer is StartEvaluation (the handler starts it unless one with that id is running or
has results to resume), so an evaluation lost in a restart is simply started again.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from slmfleet.api.timestamps import parse_rfc3339, rfc3339

Phase = Literal["Pending", "Evaluating", "Progressing", "Paused", "Promoted", "RolledBack", "Failed"]
PHASES: tuple[str, ...] = ("Pending", "Evaluating", "Progressing", "Paused", "Promoted", "RolledBack", "Failed")
FINAL_PHASES = frozenset({"Promoted", "RolledBack", "Failed"})
EvaluationVerdict = Literal["pass", "fail", "continue"]


# ---------------------------------------------------------------------------------------------
# Steps


@dataclass(frozen=True)
class EvaluateStep:
    """Evaluate the candidate against the stable (at the current weight)."""

    sample_size: int | None = None
    """Cases for this evaluation; None: the rollout's evaluation.sampleSize."""


@dataclass(frozen=True)
class SetWeightStep:
    """Send `weight` percent of the traffic to the candidate."""

    weight: int


@dataclass(frozen=True)
class PauseStep:
    """Hold the current weight for `seconds` (live metrics keep being checked)."""

    seconds: float


Step = EvaluateStep | SetWeightStep | PauseStep

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration: `30s`, `2m`, `1h`, `1h30m`, `1.5h`, `500ms` (Go-style units ms, s, m,
    h; no sign, no spaces), or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or value != value:
            raise ValueError(f"not a duration: {value!r}")
        return float(value)
    text = str(value).strip()
    if not text:
        raise ValueError("empty duration")
    pos = 0
    seconds = 0.0
    while pos < len(text):
        match = _DURATION.match(text, pos)
        if match is None:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 2m, 1h30m)")
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return seconds


def _get(raw: Any, *names: str) -> Any:
    for name in names:
        if isinstance(raw, Mapping):
            if name in raw and raw[name] is not None:
                return raw[name]
        elif getattr(raw, name, None) is not None:
            return getattr(raw, name)
    return None


def parse_step(raw: Step | Mapping[str, Any] | Any) -> Step:
    """One step from the spec: a mapping as in YAML (`{setWeight: 10}`, `{evaluate: {}}`,
    `{pause: {duration: 2m}}`), an object with `set_weight` / `evaluate` / `pause` attributes
    (the API's pydantic Step), or a Step already."""
    if isinstance(raw, (EvaluateStep, SetWeightStep, PauseStep)):
        return raw
    weight = _get(raw, "setWeight", "set_weight")
    evaluate = _get(raw, "evaluate")
    pause = _get(raw, "pause")
    present = [name for name, v in (("setWeight", weight), ("evaluate", evaluate), ("pause", pause)) if v is not None]
    if len(present) != 1:
        raise ValueError(f"a step has exactly one of setWeight, evaluate, pause; got {present or 'none'}")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise ValueError(f"setWeight must be an integer percentage 0-100, got {weight!r}")
        return SetWeightStep(weight)
    if evaluate is not None:
        size = _get(evaluate, "sampleSize", "sample_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"evaluate.sampleSize must be a positive integer, got {size!r}")
        return EvaluateStep(size)
    duration = _get(pause, "duration")
    if duration is None:
        raise ValueError("pause needs a duration, e.g. {pause: {duration: 2m}}")
    return PauseStep(parse_duration(duration))


def parse_steps(raw: Iterable[Step | Mapping[str, Any] | Any]) -> tuple[Step, ...]:
    steps = []
    for i, item in enumerate(raw):
        try:
            steps.append(parse_step(item))
        except ValueError as e:
            raise ValueError(f"steps[{i}]: {e}") from None
    return tuple(steps)


def phase_of(step: Step) -> Phase:
    if isinstance(step, EvaluateStep):
        return "Evaluating"
    if isinstance(step, PauseStep):
        return "Paused"
    return "Progressing"


# ---------------------------------------------------------------------------------------------
# State and observations


@dataclass(frozen=True)
class RolloutState:
    """What the rollout has done so far: everything `next_action` needs, all of it in status."""

    phase: Phase = "Pending"
    step: int = 0
    """Index of the current step (len(steps) once promoted)."""
    weight: int = 0
    """Canary weight applied (percent of traffic to the candidate)."""
    step_started: dt.datetime | None = None
    """When the current step began (timezone-aware)."""
    revision: str = ""
    """The candidate revision being rolled out (identifies its evaluations)."""
    reason: str = ""
    """Why it was rolled back or failed."""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}")
        if self.step < 0 or not 0 <= self.weight <= 100:
            raise ValueError(f"bad state: step {self.step}, weight {self.weight}")

    def to_status(self) -> dict[str, Any]:
        """The ModelRollout status fields this state lives in."""
        status: dict[str, Any] = {"phase": self.phase, "currentStep": self.step, "canaryWeight": self.weight}
        if self.step_started is not None:
            status["stepStartedAt"] = rfc3339(self.step_started)
        if self.revision:
            status["candidateRevision"] = self.revision
        if self.reason:
            status["message"] = self.reason
        return status

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None, *, revision: str = "") -> RolloutState:
        """The state in a ModelRollout status (camelCase keys); an empty status is a new rollout of
        `revision`. The reason is read back from `message` only in the final failure phases."""
        if not status or not status.get("phase"):
            return cls(revision=revision)
        phase = status["phase"]
        started = status.get("stepStartedAt")
        return cls(
            phase=phase,
            step=int(status.get("currentStep") or 0),
            weight=int(status.get("canaryWeight") or 0),
            step_started=parse_rfc3339(started),
            revision=status.get("candidateRevision") or revision,
            reason=(status.get("message") or "") if phase in ("RolledBack", "Failed") else "",
        )


def evaluation_id(revision: str, step: int) -> str:
    """The identity of the evaluation at `step` of the rollout of `revision`: derived, never stored,
    so it cannot go stale; an evaluation started twice under it is the same evaluation."""
    return f"{revision}/step-{step}" if revision else f"step-{step}"


@dataclass(frozen=True)
class EvaluationObservation:
    """The evaluation the handler knows of: its id, and its verdict (None: running, no verdict)."""

    id: str
    verdict: EvaluationVerdict | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in (None, "pass", "fail", "continue"):
            raise ValueError(f"unknown verdict {self.verdict!r}")


@dataclass(frozen=True)
class Observations:
    """What the handler saw this time; every field is about the current candidate revision."""

    candidate_ready: bool = False
    """The candidate has at least one Ready replica."""
    evaluation: EvaluationObservation | None = None
    """The latest evaluation for the current step, if any (one with another id is ignored)."""
    live_regression: str | None = None
    """Why the live p95 latency or error rate of the candidate breaches its threshold, if it does."""
    candidate_failure: str | None = None
    """Why the candidate cannot serve at all (e.g. no placement, weights that fail verification)."""
    base_deprecated: str | None = None
    """Why the candidate's base model is deprecated, if it is."""
    applied_weight: int | None = None
    """The canary weight the cluster actually has (HTTPRoute or replica ratio), when known."""
    promoted: bool | None = None
    """The SmallModel already serves the candidate as its stable revision (None: not known)."""


# ---------------------------------------------------------------------------------------------
# Actions


@dataclass(frozen=True)
class StartEvaluation:
    """Ensure the evaluation `evaluation_id` runs (start it unless it is running or has results)."""

    kind: ClassVar[str] = "StartEvaluation"
    step: int
    evaluation_id: str
    sample_size: int | None
    state: RolloutState
    message: str


@dataclass(frozen=True)
class SetWeight:
    """Send `weight` percent of the traffic to the candidate."""

    kind: ClassVar[str] = "SetWeight"
    weight: int
    state: RolloutState
    message: str


@dataclass(frozen=True)
class Wait:
    """Nothing to do before `until` (requeue then), unless an observation changes."""

    kind: ClassVar[str] = "Wait"
    until: dt.datetime
    state: RolloutState
    message: str


@dataclass(frozen=True)
class Advance:
    """The current step is done: record `state` (now at `to_step`)."""

    kind: ClassVar[str] = "Advance"
    to_step: int
    state: RolloutState
    message: str


@dataclass(frozen=True)
class Promote:
    """Every step passed: the candidate becomes the stable revision."""

    kind: ClassVar[str] = "Promote"
    state: RolloutState
    message: str


@dataclass(frozen=True)
class Rollback:
    """Canary weight to 0 and the candidate scaled to 0; `state.phase` is RolledBack (the candidate
    was judged and found wanting) or Failed (it could not be rolled out at all)."""

    kind: ClassVar[str] = "Rollback"
    reason: str
    state: RolloutState
    message: str


@dataclass(frozen=True)
class Nothing:
    """Nothing to do until an observation changes."""

    kind: ClassVar[str] = "Nothing"
    state: RolloutState
    message: str


Action = StartEvaluation | SetWeight | Wait | Advance | Promote | Rollback | Nothing


def _rollback(state: RolloutState, phase: Phase, reason: str) -> Rollback:
    new = replace(state, phase=phase, weight=0, reason=reason)
    return Rollback(reason, new, f"rolling back: {reason}")


def _enter(steps: tuple[Step, ...], state: RolloutState, to_step: int, now: dt.datetime, done: str) -> Action:
    if to_step >= len(steps):
        new = replace(state, phase="Promoted", step=len(steps), weight=100, step_started=now, reason="")
        revision = state.revision or "(candidate)"
        return Promote(new, f"{done}; all {len(steps)} steps passed: promoting revision {revision}")
    new = replace(state, phase=phase_of(steps[to_step]), step=to_step, step_started=now)
    return Advance(to_step, new, f"{done}; step {to_step}: {_describe(steps[to_step])}")


def _describe(step: Step) -> str:
    if isinstance(step, SetWeightStep):
        return f"setWeight {step.weight}"
    if isinstance(step, PauseStep):
        return f"pause {step.seconds:g}s"
    return "evaluate" + (f" ({step.sample_size} cases)" if step.sample_size else "")


def next_action(steps: Iterable[Step | Mapping[str, Any] | Any], state: RolloutState, observations: Observations,
                now: dt.datetime) -> Action:
    """The next thing to do. Pure and deterministic; see the module docstring for the rules."""
    # Long on purpose: one rule per phase, in the order the module docstring gives them, so the
    # whole machine reads top to bottom in one place (as Argo Rollouts' rolloutCanary does).
    steps = parse_steps(steps)
    obs = observations
    if state.phase == "Promoted":
        if obs.promoted is False:  # recorded before its effect, which a crash cut short
            return Promote(state, f"promoted in status, not yet in the model: promoting {state.revision or 'it'}")
        return Nothing(state, "promoted")
    if state.phase in ("RolledBack", "Failed"):
        if obs.applied_weight not in (None, 0):
            return Rollback(state.reason, state,
                            f"{obs.applied_weight}% of the traffic is on a rolled-back candidate: back to 0")
        return Nothing(state, f"{state.phase.lower()}: {state.reason}")

    if obs.promoted:  # promoted, but the status write was lost: record it
        return _enter(steps, state, len(steps), now, "the model already serves the candidate as stable")

    # refusals and failures, at any step
    if obs.base_deprecated:
        return _rollback(state, "Failed", f"the candidate's base model is deprecated: {obs.base_deprecated}")
    if obs.candidate_failure:
        return _rollback(state, "Failed", f"the candidate revision cannot serve: {obs.candidate_failure}")
    serving = max(state.weight, obs.applied_weight or 0)
    if serving > 0 and obs.live_regression:
        return _rollback(state, "RolledBack",
                         f"live metrics regressed at step {state.step} ({serving}% canary): {obs.live_regression}")
    if serving > 0 and not obs.candidate_ready:
        return _rollback(state, "RolledBack",
                         f"the candidate has no ready replica while it gets {serving}% of the traffic")

    if state.phase == "Pending":
        if not obs.candidate_ready:
            return Nothing(state, "waiting for the candidate revision to become ready")
        return _enter(steps, state, 0, now, "candidate ready")
    if state.step > len(steps):
        return _rollback(state, "Failed", f"current step {state.step} is beyond the {len(steps)} steps of the spec")
    if state.step == len(steps):
        return _enter(steps, state, len(steps), now, "steps done")

    step = steps[state.step]
    eid = evaluation_id(state.revision, state.step)
    seen = obs.evaluation if obs.evaluation is not None and obs.evaluation.id == eid else None
    if isinstance(step, EvaluateStep) and seen is not None and seen.verdict == "fail":
        why = f": {seen.reason}" if seen.reason else ""
        return _rollback(state, "RolledBack", f"evaluation at step {state.step} failed{why}")

    if obs.applied_weight is not None and obs.applied_weight != state.weight:
        if isinstance(step, SetWeightStep) and obs.applied_weight == step.weight:
            # the weight was applied but its status write was lost: record it, do not apply again
            return _enter(steps, replace(state, weight=step.weight), state.step + 1, now,
                          f"weight {step.weight} already applied")
        return SetWeight(state.weight, state,
                         f"the cluster has {obs.applied_weight}% on the candidate, status says {state.weight}%: "
                         "re-applying")

    if isinstance(step, SetWeightStep):
        if state.weight == step.weight:
            return _enter(steps, state, state.step + 1, now, f"weight {step.weight} set")
        return SetWeight(step.weight, replace(state, phase="Progressing", weight=step.weight),
                         f"step {state.step}: canary weight {state.weight}% -> {step.weight}%")

    if isinstance(step, PauseStep):
        started = state.step_started or now
        until = started + dt.timedelta(seconds=step.seconds)
        if now >= until:
            return _enter(steps, state, state.step + 1, now, f"paused {step.seconds:g}s")
        return Wait(until, replace(state, phase="Paused", step_started=started),
                    f"step {state.step}: paused at {state.weight}% until {rfc3339(until)}")

    evaluating = replace(state, phase="Evaluating")
    if seen is not None and seen.verdict == "pass":
        return _enter(steps, state, state.step + 1, now, f"evaluation {eid} passed")
    if seen is not None:
        return Nothing(evaluating, f"step {state.step}: evaluation {eid} running")
    if not obs.candidate_ready:
        return Nothing(evaluating, "waiting for the candidate revision to become ready")
    return StartEvaluation(state.step, eid, step.sample_size, evaluating,
                           f"step {state.step}: evaluating candidate vs stable at {state.weight}% ({eid})")
