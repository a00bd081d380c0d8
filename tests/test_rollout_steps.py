"""The rollout step state machine: walks, failures, crashes, replays, status round trips."""

import datetime as dt
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmfleet.api.modelrollout import Step as ApiStep
from slmfleet.rollout.steps import (
    Advance,
    EvaluateStep,
    EvaluationObservation,
    Nothing,
    Observations,
    PauseStep,
    Promote,
    Rollback,
    RolloutState,
    SetWeight,
    SetWeightStep,
    StartEvaluation,
    Wait,
    evaluation_id,
    next_action,
    parse_duration,
    parse_step,
    parse_steps,
)

FAST = settings(max_examples=150, deadline=None)
T0 = dt.datetime(2026, 11, 21, 10, 0, 0, tzinfo=dt.UTC)
EXAMPLE = [
    {"evaluate": {}},
    {"setWeight": 10},
    {"evaluate": {}},
    {"pause": {"duration": "2m"}},
    {"setWeight": 50},
    {"evaluate": {}},
    {"setWeight": 100},
]


@dataclass
class World:
    """The cluster and the evaluation runner, as the handler would observe them."""

    weight: int = 0
    promoted: bool = False
    ready: bool = True
    evaluations: dict = field(default_factory=dict)  # id -> verdict
    verdicts: dict = field(default_factory=dict)  # step index -> verdict the evaluation will reach
    live_regression: str | None = None
    deprecated: str | None = None
    now: dt.datetime = T0
    weight_changes: list = field(default_factory=list)
    started: list = field(default_factory=list)

    def observe(self, state: RolloutState) -> Observations:
        eid = evaluation_id(state.revision, state.step)
        ev = EvaluationObservation(eid, self.evaluations[eid]) if eid in self.evaluations else None
        return Observations(candidate_ready=self.ready, evaluation=ev, live_regression=self.live_regression,
                            base_deprecated=self.deprecated, applied_weight=self.weight,
                            promoted=self.promoted)

    def perform(self, action) -> None:
        if isinstance(action, SetWeight):
            self._set(action.weight)
        elif isinstance(action, StartEvaluation):
            if action.evaluation_id not in self.evaluations:  # idempotent by id
                self.started.append(action.evaluation_id)
                self.evaluations[action.evaluation_id] = self.verdicts.get(action.step, "pass")
        elif isinstance(action, Wait):
            self.now = action.until
        elif isinstance(action, Rollback):
            self._set(0)
        elif isinstance(action, Promote):
            self._set(100)
            self.promoted = True

    def _set(self, weight: int) -> None:
        if weight != self.weight:
            self.weight_changes.append(weight)
        self.weight = weight


def drive(steps, world: World, *, crash_after=frozenset(), regress_at=None, limit=200):
    """Run the handler loop: observe, decide, perform, record. `crash_after`: iterations whose
    status write is lost (the operator died after the effect). Returns (final state, actions)."""
    state = RolloutState(revision="rev-b")
    actions = []
    for i in range(limit):
        if regress_at is not None and i == regress_at:
            world.live_regression = "p95 latency 4.1s > 2.0s"
        obs = world.observe(state)
        action = next_action(steps, state, obs, world.now)
        # replaying the same inputs gives the same action
        assert next_action(steps, state, obs, world.now) == action
        # the step index never goes backwards
        assert action.state.step >= state.step
        actions.append(action)
        world.perform(action)
        if i not in crash_after:
            state = action.state
        if isinstance(action, Nothing) and state.phase in ("Promoted", "RolledBack", "Failed"):
            return state, actions
    raise AssertionError(f"no end after {limit} actions: {[a.kind for a in actions]}")


def kinds(actions):
    return [a.kind for a in actions]


# --- walks -----------------------------------------------------------------------------------


def test_the_example_walks_to_promotion():
    world = World()
    state, actions = drive(EXAMPLE, world)
    assert state.phase == "Promoted" and state.step == len(EXAMPLE) and state.weight == 100
    assert kinds(actions) == [
        "Advance",  # candidate ready: enter step 0
        "StartEvaluation", "Advance",  # evaluate at 0%
        "SetWeight", "Advance",  # 10%
        "StartEvaluation", "Advance",  # evaluate at 10%
        "Wait", "Advance",  # pause 2m
        "SetWeight", "Advance",  # 50%
        "StartEvaluation", "Advance",  # evaluate at 50%
        "SetWeight", "Promote",  # 100%, all done
        "Nothing",
    ]
    assert world.weight_changes == [10, 50, 100]
    assert world.started == ["rev-b/step-0", "rev-b/step-2", "rev-b/step-5"]
    assert world.now == T0 + dt.timedelta(minutes=2)
    wait = next(a for a in actions if isinstance(a, Wait))
    assert wait.until == T0 + dt.timedelta(minutes=2) and wait.state.phase == "Paused"


@pytest.mark.parametrize("failing_step", [0, 2, 5])
def test_a_failed_evaluation_at_any_step_rolls_back(failing_step):
    world = World(verdicts={failing_step: "fail"})
    state, actions = drive(EXAMPLE, world)
    assert state.phase == "RolledBack" and state.weight == 0 and world.weight == 0
    assert state.step == failing_step
    assert f"evaluation at step {failing_step} failed" in state.reason
    rollback = [a for a in actions if isinstance(a, Rollback)]
    assert len(rollback) == 1
    assert not any(isinstance(a, (SetWeight, Promote)) for a in actions[actions.index(rollback[0]):])


def test_a_live_regression_during_traffic_rolls_back():
    world = World()
    state, actions = drive(EXAMPLE, world, regress_at=8)  # during the pause at 10%
    assert state.phase == "RolledBack" and world.weight == 0
    assert "live metrics regressed" in state.reason and "10% canary" in state.reason


def test_a_live_regression_without_traffic_is_ignored():
    state = RolloutState(phase="Evaluating", step=0, weight=0, step_started=T0, revision="r")
    obs = Observations(candidate_ready=True, live_regression="error rate 0.5", applied_weight=0)
    assert isinstance(next_action(EXAMPLE, state, obs, T0), StartEvaluation)


def test_a_deprecated_base_is_refused():
    world = World(deprecated="licence withdrawn upstream")
    state, actions = drive(EXAMPLE, world)
    assert state.phase == "Failed" and "deprecated" in state.reason
    assert kinds(actions) == ["Rollback", "Nothing"]


def test_waits_for_a_ready_candidate_and_rolls_back_if_it_dies_under_traffic():
    pending = RolloutState(revision="r")
    assert isinstance(next_action(EXAMPLE, pending, Observations(candidate_ready=False), T0), Nothing)
    at_10 = RolloutState(phase="Paused", step=3, weight=10, step_started=T0, revision="r")
    action = next_action(EXAMPLE, at_10, Observations(candidate_ready=False, applied_weight=10), T0)
    assert isinstance(action, Rollback) and action.state.weight == 0 and "no ready replica" in action.reason
    failed = next_action(EXAMPLE, pending, Observations(candidate_failure="no placement fits"), T0)
    assert isinstance(failed, Rollback) and failed.state.phase == "Failed"


def test_a_rolled_back_rollout_stays_rolled_back_and_reasserts_weight_zero():
    done = RolloutState(phase="RolledBack", step=2, weight=0, revision="r", reason="evaluation at step 2 failed")
    everything_fine = Observations(candidate_ready=True, evaluation=EvaluationObservation("r/step-2", "pass"))
    assert isinstance(next_action(EXAMPLE, done, everything_fine, T0), Nothing)
    reassert = next_action(EXAMPLE, done, replace(everything_fine, applied_weight=10), T0)
    assert isinstance(reassert, Rollback) and reassert.state == done
    promoted = RolloutState(phase="Promoted", step=7, weight=100, revision="r")
    assert isinstance(next_action(EXAMPLE, promoted, everything_fine, T0), Nothing)


def test_a_weight_already_set_is_not_set_again():
    state = RolloutState(phase="Progressing", step=1, weight=10, step_started=T0, revision="r")
    action = next_action(EXAMPLE, state, Observations(candidate_ready=True, applied_weight=10), T0)
    assert isinstance(action, Advance) and action.to_step == 2


def test_a_lost_status_write_after_a_weight_change_is_recorded_not_repeated():
    # status still says weight 0 at the setWeight 10 step, but the route already has 10
    state = RolloutState(phase="Progressing", step=1, weight=0, step_started=T0, revision="r")
    action = next_action(EXAMPLE, state, Observations(candidate_ready=True, applied_weight=10), T0)
    assert isinstance(action, Advance) and action.state.weight == 10 and action.state.step == 2


def test_drifted_weight_is_reapplied():
    state = RolloutState(phase="Paused", step=3, weight=10, step_started=T0, revision="r")
    action = next_action(EXAMPLE, state, Observations(candidate_ready=True, applied_weight=30), T0)
    assert isinstance(action, SetWeight) and action.weight == 10 and action.state == state


def test_evaluations_of_other_steps_are_ignored_and_running_ones_waited_for():
    state = RolloutState(phase="Evaluating", step=2, weight=10, step_started=T0, revision="r")
    stale = Observations(candidate_ready=True, applied_weight=10, evaluation=EvaluationObservation("r/step-0", "pass"))
    action = next_action(EXAMPLE, state, stale, T0)
    assert isinstance(action, StartEvaluation) and action.evaluation_id == "r/step-2"
    running = replace(stale, evaluation=EvaluationObservation("r/step-2", None))
    assert isinstance(next_action(EXAMPLE, state, running, T0), Nothing)
    undecided = replace(stale, evaluation=EvaluationObservation("r/step-2", "continue"))
    assert isinstance(next_action(EXAMPLE, state, undecided, T0), Nothing)


def test_pause_waits_until_its_end():
    state = RolloutState(phase="Paused", step=3, weight=10, step_started=T0, revision="r")
    obs = Observations(candidate_ready=True, applied_weight=10)
    wait = next_action(EXAMPLE, state, obs, T0 + dt.timedelta(seconds=30))
    assert isinstance(wait, Wait) and wait.until == T0 + dt.timedelta(minutes=2)
    go = next_action(EXAMPLE, state, obs, T0 + dt.timedelta(minutes=2))
    assert isinstance(go, Advance) and go.to_step == 4 and go.state.step_started == T0 + dt.timedelta(minutes=2)


def test_promotion_survives_a_crash_on_either_side_of_its_status_write():
    # effect done, status write lost: recorded
    state = RolloutState(phase="Evaluating", step=6, weight=50, step_started=T0, revision="r")
    obs = Observations(candidate_ready=True, applied_weight=100, promoted=True)
    action = next_action(EXAMPLE, state, obs, T0)
    assert isinstance(action, Promote) and action.state.phase == "Promoted"
    # status written first, effect lost: promoted again
    written = action.state
    redo = next_action(EXAMPLE, written, replace(obs, promoted=False, applied_weight=50), T0)
    assert isinstance(redo, Promote) and redo.state == written
    assert isinstance(next_action(EXAMPLE, written, obs, T0), Nothing)


def test_steps_beyond_the_spec_fail_safe():
    state = RolloutState(phase="Progressing", step=9, weight=10, step_started=T0, revision="r")
    action = next_action(EXAMPLE, state, Observations(candidate_ready=True, applied_weight=10), T0)
    assert isinstance(action, Rollback) and action.state.phase == "Failed"


# --- properties ------------------------------------------------------------------------------

step_strategy = st.one_of(
    st.builds(EvaluateStep, st.none() | st.integers(10, 2000)),
    st.builds(SetWeightStep, st.integers(0, 100)),
    st.builds(PauseStep, st.sampled_from([0.0, 1.0, 30.0, 120.0, 3600.0])),
)
steps_strategy = st.lists(step_strategy, min_size=1, max_size=10)


@FAST
@given(steps_strategy)
def test_all_passing_steps_end_promoted_each_weight_set_once(steps):
    world = World()
    state, actions = drive(steps, world)
    assert state.phase == "Promoted" and world.weight == 100
    expected, current = [], 0
    for s in steps:
        if isinstance(s, SetWeightStep) and s.weight != current:
            expected.append(s.weight)
            current = s.weight
    if current != 100:
        expected.append(100)
    assert world.weight_changes == expected
    assert len(world.started) == sum(isinstance(s, EvaluateStep) for s in steps)


@FAST
@given(steps_strategy.filter(lambda s: any(isinstance(x, EvaluateStep) for x in s)), st.data())
def test_a_failure_at_any_evaluation_rolls_back(steps, data):
    evaluations = [i for i, s in enumerate(steps) if isinstance(s, EvaluateStep)]
    failing = data.draw(st.sampled_from(evaluations))
    world = World(verdicts={failing: "fail"})
    state, actions = drive(steps, world)
    assert state.phase == "RolledBack" and state.step == failing and world.weight == 0
    assert not any(isinstance(a, Promote) for a in actions)


@FAST
@given(steps_strategy, st.data())
def test_lost_status_writes_change_nothing_in_the_outcome(steps, data):
    clean_world = World()
    clean_state, _ = drive(steps, clean_world)
    crashes = data.draw(st.frozensets(st.integers(0, 40), max_size=8))
    world = World()
    state, _ = drive(steps, world, crash_after=crashes)
    assert state.phase == clean_state.phase == "Promoted"
    # no weight step was applied twice, no evaluation run twice
    assert world.weight_changes == clean_world.weight_changes
    assert world.started == clean_world.started


@FAST
@given(steps_strategy.filter(lambda s: any(isinstance(x, EvaluateStep) for x in s)), st.data())
def test_lost_status_writes_do_not_change_a_rollback(steps, data):
    evaluations = [i for i, s in enumerate(steps) if isinstance(s, EvaluateStep)]
    failing = data.draw(st.sampled_from(evaluations))
    clean_world = World(verdicts={failing: "fail"})
    clean_state, _ = drive(steps, clean_world)
    world = World(verdicts={failing: "fail"})
    state, _ = drive(steps, world, crash_after=data.draw(st.frozensets(st.integers(0, 40), max_size=8)))
    assert state == clean_state and state.phase == "RolledBack"
    assert world.weight_changes == clean_world.weight_changes and world.weight == 0


@FAST
@given(steps_strategy, st.integers(0, 30))
def test_a_live_regression_rolls_back_whenever_the_candidate_has_traffic(steps, when):
    _, clean = drive(steps, World())
    promote = next(i for i, a in enumerate(clean) if isinstance(a, Promote))
    # at iteration i the machine sees the state recorded by action i - 1
    traffic_after = any(clean[i - 1].state.weight > 0 for i in range(max(when, 1), promote + 1))
    world = World()
    state, _ = drive(steps, world, regress_at=when)
    if when <= promote and traffic_after:
        assert state.phase == "RolledBack" and world.weight == 0
        assert "live metrics regressed" in state.reason
    else:
        assert state.phase == "Promoted"


@FAST
@given(
    st.sampled_from(["Pending", "Evaluating", "Progressing", "Paused", "Promoted", "RolledBack", "Failed"]),
    st.integers(0, 40),
    st.integers(0, 100),
    st.none() | st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1),
                             timezones=st.just(dt.UTC)).map(lambda d: d.replace(microsecond=0)),
    st.text(alphabet="abcdef0123456789", max_size=10),
    st.text(max_size=30),
)
def test_state_round_trips_through_status(phase, step, weight, started, revision, reason):
    reason = reason if phase in ("RolledBack", "Failed") else ""
    state = RolloutState(phase=phase, step=step, weight=weight, step_started=started, revision=revision,
                         reason=reason)
    assert RolloutState.from_status(state.to_status(), revision=revision) == state


def test_empty_status_is_a_new_rollout():
    assert RolloutState.from_status({}, revision="abc") == RolloutState(revision="abc")
    assert RolloutState.from_status(None) == RolloutState()
    status = RolloutState(phase="Paused", step=3, weight=10, step_started=T0, revision="abc").to_status()
    assert status == {"phase": "Paused", "currentStep": 3, "canaryWeight": 10,
                      "stepStartedAt": "2026-11-21T10:00:00Z", "candidateRevision": "abc"}


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30), ("2m", 120), ("1h", 3600), ("1h30m", 5400), ("1.5h", 5400), ("500ms", 0.5), ("0s", 0),
    (45, 45), (2.5, 2.5),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2", "2 m", "-1s", "1d", "m", "1h 30m", True, -3])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_steps_from_yaml_and_from_the_api_models():
    parsed = parse_steps(EXAMPLE)
    assert parsed == (EvaluateStep(), SetWeightStep(10), EvaluateStep(), PauseStep(120.0), SetWeightStep(50),
                      EvaluateStep(), SetWeightStep(100))
    api = [ApiStep.model_validate(s) for s in EXAMPLE + [{"evaluate": {"sampleSize": 200}}]]
    assert parse_steps(api) == parsed + (EvaluateStep(200),)
    assert parse_step({"evaluate": {"sample_size": 50}}) == EvaluateStep(50)


@pytest.mark.parametrize("raw", [
    {}, {"setWeight": 10, "evaluate": {}}, {"setWeight": 101}, {"setWeight": "10"}, {"pause": {}},
    {"pause": {"duration": "soon"}}, {"evaluate": {"sampleSize": 0}},
])
def test_parse_step_rejects(raw):
    with pytest.raises(ValueError):
        parse_steps([raw])


def test_bad_states_are_refused():
    with pytest.raises(ValueError):
        RolloutState(phase="Running")
    with pytest.raises(ValueError):
        RolloutState(weight=101)
    with pytest.raises(ValueError):
        EvaluationObservation("x", "Pass")
