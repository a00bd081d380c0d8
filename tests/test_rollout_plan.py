"""A SmallModel governed by a ModelRollout, planned against the simulated world of test_model_plan:
the candidate next to the stable, the step machine driving weights, promotion, rollback, retry,
deprecated base models and restarts (a plan made from the status alone)."""

from __future__ import annotations

import copy
from typing import Any

from slmfleet.builders.service import CANARY_ANNOTATION
from slmfleet.planning.model import Observed
from slmfleet.planning.rollout import EvaluationSnapshot, RolloutObserved
from slmfleet.rollout.deprecations import parse_deprecations
from tests.test_model_plan import (
    DIGEST,
    NAME,
    NAMESPACE,
    NEW_DIGEST,
    T0,
    World,
    at,
    condition,
    default_fleet,
    model_body,
    placed,
    spec_revision,
)

ROLLOUT_UID = "7f1c2d3e-0000-4000-8000-000000000001"
THIRD_DIGEST = "sha256:" + "ef" * 32


def rollout_body(steps: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "slmfleet.io/v1alpha1", "kind": "ModelRollout",
        "metadata": {"name": f"{NAME}-rollout", "namespace": NAMESPACE, "uid": ROLLOUT_UID, "generation": 1},
        "spec": {
            "modelRef": {"name": NAME},
            "steps": steps or [{"evaluate": {}}, {"setWeight": 50}, {"evaluate": {}}, {"setWeight": 100}],
            "evaluation": {"dataset": {"inline": [{"prompt": "2+2=", "expected": "4"}]},
                           "scorers": [{"type": "exactMatch"}]},
            "scaleDownDelaySeconds": 60,
            **spec,
        },
    }


def result(verdict: str, n: int = 130) -> dict[str, Any]:
    return {"step": 0, "n": n, "planned": 650, "stableScore": "0.8500", "candidateScore": "0.8400",
            "difference": "-0.0100", "ciLow": "-0.0200", "ciHigh": "0.0050", "method": "paired test",
            "verdict": verdict, "reason": "non-inferior" if verdict == "Pass" else "inferior"}


class RolloutWorld(World):
    """The World with a ModelRollout: its status is kept like the model's, evaluations are what the
    test says the operator's background runs know, live regressions and the gateway are set by hand."""

    def __init__(self, body: dict[str, Any], rollout: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(body, default_fleet(), **kwargs)
        self.rollout = copy.deepcopy(rollout)
        self.snapshots: dict[str, EvaluationSnapshot] = {}
        self.live_regression: str | None = None
        self.gateway_api = False
        self.route: dict[str, Any] | None = None
        self.rollout_events: list[Any] = []
        self.started: list[str] = []
        self.deprecations = parse_deprecations("")

    def observe(self) -> Observed:
        obs = super().observe()
        # applied_weight is left out: the plan reads it back from the model Service or the route
        ro = RolloutObserved.of(copy.deepcopy(self.rollout), evaluations=dict(self.snapshots),
                             live_regression=self.live_regression, gateway_api=self.gateway_api)
        return Observed(**{**obs.__dict__, "rollout": ro, "route": copy.deepcopy(self.route),
                           "deprecations": self.deprecations})

    def apply(self, plan) -> None:
        routes = [o for o in plan.apply if o["kind"] == "HTTPRoute"]
        plan_without_routes = type(plan)(**{**plan.__dict__, "apply": tuple(o for o in plan.apply if o["kind"] != "HTTPRoute")})
        super().apply(plan_without_routes)
        for route in routes:
            self.route = copy.deepcopy(route)
        if plan.rollout is not None:
            if plan.rollout.status is not None:
                self.rollout["status"] = copy.deepcopy(plan.rollout.status)
            self.rollout_events.extend(plan.rollout.events)
            if plan.rollout.start is not None:
                self.started.append(plan.rollout.start.evaluation_id)
                self.snapshots.setdefault(plan.rollout.start.evaluation_id, EvaluationSnapshot("running"))

    @property
    def rollout_status(self) -> dict[str, Any]:
        return self.rollout.get("status") or {}

    def finish(self, verdict: str) -> None:
        """The evaluation the plan last started ends with `verdict`."""
        eid = self.started[-1]
        self.snapshots[eid] = EvaluationSnapshot(verdict.lower(), verdict, result(verdict))

    def candidate_ready(self) -> None:
        self.mark_ready(self.status["revision"])


def stable_world(rollout: dict[str, Any] | None = None, base: str | None = "org/base-v1") -> tuple[RolloutWorld, str]:
    body = model_body()
    body["spec"]["baseModel"] = base
    world = RolloutWorld(body, rollout or rollout_body())
    placed(world)
    stable = world.status["servingRevision"]
    assert world.status["history"][-1]["outcome"] == "Serving"
    return world, stable


def new_candidate(world: RolloutWorld, digest: str = NEW_DIGEST, base: str = "org/base-v2") -> str:
    def change(spec: dict[str, Any]) -> None:
        spec["source"]["digest"] = digest
        spec["source"]["uri"] = f"pvc://model-store/{digest[7:15]}"
        spec["baseModel"] = base
    world.edit_spec(change)
    return spec_revision(world.body)


def past_the_first_evaluation(world: RolloutWorld, **candidate: Any) -> str:
    """A new candidate, ready, whose first evaluation passed: the plan moved on to the next steps."""
    revision = new_candidate(world, **candidate)
    world.settle(at(1))
    world.candidate_ready()
    world.settle(at(2))
    world.finish("Pass")
    world.settle(at(3))
    return revision


def selector(world: RolloutWorld) -> dict[str, str]:
    return world.objects[("Service", NAME)]["spec"]["selector"]


def replicas(world: RolloutWorld, revision: str) -> int:
    return world.objects[("Deployment", f"{NAME}-{revision}")]["spec"]["replicas"]


def reasons(events) -> list[str]:
    return [e.reason for e in events]


def test_a_new_revision_runs_beside_the_stable_and_is_evaluated_before_any_traffic():
    world, stable = stable_world()
    stable_dep = copy.deepcopy(world.deployment(stable))
    candidate = new_candidate(world)
    world.settle(at(1))
    assert world.status["servingRevision"] == stable and world.status["revision"] == candidate
    assert replicas(world, candidate) == 1
    assert selector(world)["slmfleet.io/revision"] == stable
    assert world.rollout_status["phase"] == "Pending" and world.rollout_status["candidateRevision"] == candidate
    assert condition(world.status, "Progressing")["reason"] == "Canary"
    assert condition(world.status, "Ready")["status"] == "True"

    world.candidate_ready()
    world.settle(at(2))
    assert world.rollout_status["phase"] == "Evaluating" and world.rollout_status["canaryWeight"] == 0
    assert world.started == [f"{candidate}/step-0"]
    assert "EvaluationStarted" in reasons(world.rollout_events)
    assert world.deployment(stable)["spec"] == stable_dep["spec"], "the stable is never touched"
    # The replica ratio needs the model Service only: no revision has a Service of its own.
    assert {name for kind, name in world.objects if kind == "Service"} == {NAME}


def test_passing_evaluations_move_the_weight_step_by_step_and_promote():
    world, stable = stable_world()
    candidate = past_the_first_evaluation(world)
    # step 1 set 50%: the Service spreads over both revisions, the next evaluation started
    assert world.rollout_status["canaryWeight"] == 50 and world.rollout_status["currentStep"] == 2
    assert selector(world) == {"slmfleet.io/model": NAME}
    assert world.objects[("Service", NAME)]["metadata"]["annotations"][CANARY_ANNOTATION] == f"{candidate}=50"
    assert world.started[-1] == f"{candidate}/step-2"
    assert world.rollout_status["evaluations"][0]["verdict"] == "Pass"

    world.finish("Pass")
    world.settle(at(4))
    assert world.rollout_status["phase"] == "Promoted"
    assert world.status["servingRevision"] == candidate
    assert selector(world)["slmfleet.io/revision"] == candidate
    assert [h["outcome"] for h in world.status["history"]] == ["Replaced", "Promoted"]
    assert world.status["history"][-1]["digest"] == NEW_DIGEST
    assert "Promoted" in reasons(world.rollout_events)
    # the old stable stays for the grace period, then goes
    assert ("Deployment", f"{NAME}-{stable}") in world.objects
    world.mark_ready(candidate)
    plan = world.plan(at(30))
    assert not plan.delete and plan.requeue_after is not None
    world.settle(at(70))
    assert ("Deployment", f"{NAME}-{stable}") not in world.objects
    assert condition(world.status, "Ready")["status"] == "True"


def test_a_failed_evaluation_rolls_back_at_once_and_the_stable_keeps_serving():
    world, stable = stable_world()
    stable_dep = copy.deepcopy(world.deployment(stable))
    candidate = past_the_first_evaluation(world)
    assert world.rollout_status["canaryWeight"] == 50
    world.finish("Fail")
    plan = world.reconcile(at(4))
    # one plan: weight 0 (selector back on the stable), candidate at 0 replicas, statuses
    assert selector(world)["slmfleet.io/revision"] == stable
    assert replicas(world, candidate) == 0
    assert world.rollout_status["phase"] == "RolledBack" and world.rollout_status["canaryWeight"] == 0
    assert "RolledBack" in reasons(plan.rollout.events)
    degraded = condition(world.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RolloutFailed")
    assert condition(world.status, "Ready")["status"] == "True"
    assert world.status["servingRevision"] == stable
    assert world.status["history"][-1]["outcome"] == "RolledBack"
    assert world.deployment(stable)["spec"] == stable_dep["spec"]
    world.settle(at(5))
    assert world.plan(at(100)).writes == 0


def test_a_restarted_operator_resumes_from_status_without_repeating_a_weight_step():
    world, _ = stable_world()
    candidate = past_the_first_evaluation(world)
    before = copy.deepcopy(world.rollout_status)
    events_before = len(world.rollout_events)
    # restart: the background evaluations are gone; status has the verdict of step 0
    world.snapshots.clear()
    plan = world.reconcile(at(4))
    assert "CanaryWeight" not in reasons(plan.rollout.events)
    assert world.rollout_status["canaryWeight"] == before["canaryWeight"] == 50
    assert world.rollout_status["currentStep"] == before["currentStep"]
    assert plan.rollout.start is not None and plan.rollout.start.evaluation_id == f"{candidate}/step-2"
    assert len(world.rollout_events) == events_before  # the evaluation restarts quietly


def test_a_weight_applied_but_not_recorded_is_recorded_not_applied_again():
    world, _ = stable_world(rollout_body(steps=[{"setWeight": 50}, {"pause": {"duration": "1h"}}]))
    new_candidate(world)
    world.settle(at(1))
    world.candidate_ready()
    saved = copy.deepcopy(world.rollout)
    world.reconcile(at(2))
    assert world.rollout_status["canaryWeight"] == 50
    world.rollout = saved  # the status write was lost in a crash
    plan = world.reconcile(at(3))
    assert world.rollout_status["canaryWeight"] == 50 and world.rollout_status["phase"] == "Paused"
    assert "CanaryWeight" not in reasons(plan.rollout.events)


def test_a_live_regression_during_a_traffic_step_rolls_back():
    world, stable = stable_world(rollout_body(steps=[{"setWeight": 50}, {"pause": {"duration": "10m"}}, {"setWeight": 100}]))
    candidate = new_candidate(world)
    world.settle(at(1))
    world.candidate_ready()
    plan = world.reconcile(at(2))
    assert world.rollout_status["phase"] == "Paused" and plan.requeue_after is not None
    world.live_regression = "p95 latency 4.100s > 2.000s"
    world.reconcile(at(3))
    assert world.rollout_status["phase"] == "RolledBack"
    assert "p95 latency" in world.rollout_status["message"]
    assert replicas(world, candidate) == 0 and selector(world)["slmfleet.io/revision"] == stable


def rolled_back(world: RolloutWorld) -> str:
    """A new candidate, ready, whose first evaluation failed: rolled back."""
    candidate = new_candidate(world)
    world.settle(at(1))
    world.candidate_ready()
    world.settle(at(2))
    world.finish("Fail")
    world.settle(at(3))
    assert world.rollout_status["phase"] == "RolledBack"
    return candidate


def test_a_rolled_back_revision_is_not_retried_until_the_retry_annotation_asks():
    world, stable = stable_world()
    candidate = rolled_back(world)
    # the spec moves on, then back to the failed revision: it is not rolled out again
    new_candidate(world, THIRD_DIGEST)
    world.settle(at(4))
    assert world.rollout_status["phase"] == "Pending"
    new_candidate(world)
    world.settle(at(5))
    assert world.rollout_status["phase"] == "RolledBack" and "retry" in world.rollout_status["message"]
    assert replicas(world, candidate) == 0
    # the annotation asks for it (the operator keys background evaluations by its value: a new
    # attempt sees none of the last one's)
    world.rollout["metadata"]["annotations"] = {"slmfleet.io/retry": "1"}
    world.snapshots.clear()
    world.settle(at(6))
    assert world.rollout_status["retry"] == "1"
    assert world.rollout_status["phase"] in ("Pending", "Evaluating")
    assert replicas(world, candidate) == 1
    assert world.rollout_status.get("evaluations", []) == []


def test_a_deprecated_stable_base_rolls_back_to_the_last_known_good_digest():
    world, first = stable_world(base="org/base-v1")
    candidate = past_the_first_evaluation(world, base="org/base-v2")
    world.finish("Pass")
    world.settle(at(4))
    world.mark_ready(candidate)
    world.settle(at(100))
    assert world.status["servingRevision"] == candidate
    world.deprecations = parse_deprecations("deprecations:\n- baseModel: org/base-v2\n  reason: licence withdrawn\n")
    world.settle(at(101))
    # the first revision's digest comes back (same serving config: same revision), beside the deprecated one
    assert world.status["revision"] == first
    dep = world.deployment(first)
    assert DIGEST in str(dep["spec"]) and NEW_DIGEST not in str(dep["spec"])  # the loader pins the old digest
    degraded = condition(world.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "BaseModelDeprecated")
    assert "licence withdrawn" in degraded["message"] and first in degraded["message"]
    assert world.status["servingRevision"] == candidate, "the deprecated one serves until the fallback is ready"
    world.mark_ready(first)
    world.settle(at(102))
    assert world.status["servingRevision"] == first
    assert ("Deployment", f"{NAME}-{candidate}") not in world.objects
    assert "BaseModelDeprecated" in reasons(world.events)


def test_a_rollout_to_a_deprecated_base_is_refused_and_nothing_is_deployed():
    world, stable = stable_world(base="org/base-v1")
    world.deprecations = parse_deprecations("deprecations:\n- baseModel: org/base-v2\n  reason: unsafe\n")
    candidate = new_candidate(world, base="org/base-v2")
    world.settle(at(1))
    assert ("Deployment", f"{NAME}-{candidate}") not in world.objects
    assert world.status["servingRevision"] == world.status["revision"] == stable
    degraded = condition(world.rollout_status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "BaseModelDeprecated")
    assert "unsafe" in degraded["message"]


def test_with_the_gateway_api_the_weights_go_to_an_http_route():
    world, stable = stable_world(rollout_body(steps=[{"setWeight": 20}, {"pause": {"duration": "1h"}}],
                                              traffic={"httpRoute": {"parentRefs": [{"name": "gw"}]}}))
    world.gateway_api = True
    world.settle(at(0.5))
    assert world.route is not None
    assert [b["weight"] for b in world.route["spec"]["rules"][0]["backendRefs"]] == [100]
    candidate = new_candidate(world)
    world.settle(at(1))
    world.candidate_ready()
    world.settle(at(2))
    backends = {b["name"]: b["weight"] for b in world.route["spec"]["rules"][0]["backendRefs"]}
    assert backends == {f"{NAME}-{stable}": 80, f"{NAME}-{candidate}": 20}
    # Every backend the route names is a Service selecting its revision's pods.
    for revision in (stable, candidate):
        svc = world.objects[("Service", f"{NAME}-{revision}")]
        assert svc["spec"]["selector"]["slmfleet.io/revision"] == revision
    assert selector(world)["slmfleet.io/revision"] == stable  # in-cluster clients stay on the stable
    assert world.rollout_status["canaryWeight"] == 20


def test_without_a_rollout_a_new_revision_replaces_the_old_directly():
    body = model_body()
    world = World(body, default_fleet())
    placed(world)
    world.edit_spec(lambda s: s["source"].update(digest=NEW_DIGEST))
    plan = world.reconcile(at(1))
    assert plan.rollout is None


def test_storage_down_during_a_canary_holds_the_rollout_and_a_wrong_pin_fails_it():
    from slmfleet.weights.facts import WeightsFacts

    world, stable = stable_world(rollout_body(steps=[{"setWeight": 50}, {"pause": {"duration": "1h"}}]))
    candidate = new_candidate(world)
    world.settle(at(1))
    world.candidate_ready()
    world.settle(at(2))
    assert world.rollout_status["canaryWeight"] == 50
    world.weights = WeightsFacts(digest=NEW_DIGEST, problem="StorageUnreachable", message="S3 is down", transient=True)
    world.reconcile(at(3))
    assert world.rollout_status["phase"] == "Paused" and world.rollout_status["canaryWeight"] == 50
    world.weights = WeightsFacts(digest=NEW_DIGEST, problem="DigestMismatch", message="the manifest is not the pin")
    world.reconcile(at(4))
    assert world.rollout_status["phase"] == "Failed"
    assert "DigestMismatch" in world.rollout_status["message"]
    assert world.status["servingRevision"] == stable
    assert selector(world)["slmfleet.io/revision"] == stable, "no more traffic to the candidate"
    dep = world.deployment(candidate)
    assert dep["spec"]["replicas"] == 0 and dep["spec"]["template"]["spec"]["containers"], "a whole object, at 0"
    assert world.plan(at(5)).apply == (), "applied once"


def test_a_rollout_that_governs_nothing_says_why_once():
    from slmfleet.planning.rollout import plan_not_governing

    body = rollout_body()
    status = plan_not_governing(body, "ModelNotFound", "SmallModel models/qwen-chat does not exist", T0)
    assert status is not None
    degraded = condition(status, "Degraded")
    assert (degraded["status"], degraded["reason"], degraded["observedGeneration"]) == ("True", "ModelNotFound", 1)
    assert condition(status, "Ready")["status"] == "False"
    body["status"] = status
    assert plan_not_governing(body, "ModelNotFound", "SmallModel models/qwen-chat does not exist", at(5)) is None


def test_an_evaluation_that_cannot_run_is_reported_held_and_retried_not_rolled_back():
    world, stable = stable_world()
    candidate = new_candidate(world)
    world.settle(at(1))
    world.candidate_ready()
    world.settle(at(2))
    eid = world.started[-1]
    world.snapshots[eid] = EvaluationSnapshot("error", "dataset unavailable: ConfigMap models/cases: Not Found (HTTP 404)")
    plan = world.reconcile(at(3))
    assert world.rollout_status["phase"] == "Evaluating" and world.rollout_status["canaryWeight"] == 0
    degraded = condition(world.rollout_status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "EvaluationError")
    assert "ConfigMap models/cases: Not Found" in degraded["message"]
    assert plan.rollout.start is None and plan.requeue_after == 30.0
    assert replicas(world, candidate) == 1 and world.status["servingRevision"] == stable
    # once the error is old enough, the same evaluation is started again
    world.snapshots[eid] = EvaluationSnapshot("error", "dataset unavailable", may_retry=True)
    plan = world.reconcile(at(40))
    assert plan.rollout.start is not None and plan.rollout.start.evaluation_id == eid


def test_a_rollout_started_in_the_grace_period_still_retires_the_replaced_revision_and_then_proceeds():
    """Two GPUs, one each for the serving revision and a canary. Promote, then change the model
    again while the replaced revision still holds its GPU: the new candidate fits nowhere, says so
    on the rollout, and proceeds on its own once the grace period has retired the old revision."""
    from tests.test_model_plan import L4, L4_MIB, gpu_node, revision_pod

    world = RolloutWorld(model_body(), rollout_body(steps=[{"setWeight": 100}], scaleDownDelaySeconds=60))
    world.nodes = [gpu_node("l4-a", L4, L4_MIB, 1), gpu_node("l4-b", L4, L4_MIB, 1)]
    where: dict[str, str] = {}

    def run_pods() -> None:
        """The scheduler and the kubelets: one pod per live Deployment, each on a free node."""
        live = [o for (kind, _), o in world.objects.items() if kind == "Deployment" and o["spec"]["replicas"] > 0]
        for name in list(where):
            if ("Deployment", name) not in world.objects:
                del where[name]
        pods = []
        for dep in live:
            name = dep["metadata"]["name"]
            free = [n["metadata"]["name"] for n in world.nodes if n["metadata"]["name"] not in where.values()]
            if name not in where and free:
                where[name] = free[0]
            pods.append(revision_pod(dep, f"{name}-pod", node=where.get(name)))
        world.pods = pods

    world.settle(T0)
    run_pods()
    world.mark_ready()
    world.settle(at(1))
    first = world.status["servingRevision"]

    second = new_candidate(world)
    world.settle(at(2))
    run_pods()
    world.candidate_ready()
    world.settle(at(3))
    assert world.rollout_status["phase"] == "Promoted" and world.status["servingRevision"] == second
    world.mark_ready(second)
    run_pods()

    third = new_candidate(world, digest=THIRD_DIGEST, base="org/base-v3")
    world.settle(at(10))  # 7 s after the promotion: the first revision is in its grace period
    run_pods()
    world.settle(at(11))
    assert ("Deployment", f"{NAME}-{first}") in world.objects
    assert condition(world.status, "Degraded")["reason"] == "NoFit"
    progressing = condition(world.rollout_status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "CandidateUnschedulable")
    assert third in progressing["message"] and "NVIDIA-L4" in progressing["message"]
    assert "CandidateUnschedulable" in reasons(world.rollout_events)
    plan = world.plan(at(12))
    assert plan.requeue_after is not None and plan.requeue_after <= 52, "it looks again when the grace ends"

    world.settle(at(64))  # the grace period (60 s from the promotion at 3 s) is over
    assert ("Deployment", f"{NAME}-{first}") not in world.objects
    run_pods()
    world.settle(at(65))
    assert ("Deployment", f"{NAME}-{third}") in world.objects, "the candidate is placed on the freed GPU"
    run_pods()
    world.candidate_ready()
    world.settle(at(66))
    assert world.rollout_status["phase"] == "Promoted" and world.status["servingRevision"] == third
    # The second revision, promoted once and now replaced by a promotion, gets its grace period too.
    assert ("Deployment", f"{NAME}-{second}") in world.objects
    world.settle(at(100))
    assert ("Deployment", f"{NAME}-{second}") in world.objects
    world.settle(at(127))  # 60 s after the third revision was promoted (at 66)
    assert ("Deployment", f"{NAME}-{second}") not in world.objects


def test_a_rolled_back_candidate_held_while_its_storage_is_down_keeps_the_same_zero_replica_deployment():
    """The held canary builds the candidate's Deployment at 0 the way the rollback did (the disk
    size the weights gave, the loader image it runs): the two paths do not rewrite each other."""
    from slmfleet.weights.facts import WeightsFacts

    world, stable = stable_world()
    world.weights = WeightsFacts(digest=NEW_DIGEST, disk_bytes=7 * 1024**3)
    candidate = rolled_back(world)
    assert world.deployment(candidate)["spec"]["replicas"] == 0
    world.weights = WeightsFacts(digest=NEW_DIGEST, problem="StorageUnreachable", message="S3 is down", transient=True)
    plan = world.plan(at(4))
    assert [o["kind"] for o in plan.apply if o["kind"] == "Deployment"] == []


def test_an_invalid_rollout_says_so_once_not_on_every_reconcile():
    from slmfleet.builders.owner import ModelOwner
    from slmfleet.planning.rollout import RolloutInputs, plan_rollout

    body = rollout_body()
    body["spec"]["steps"] = "not a list"
    inputs = RolloutInputs(owner=ModelOwner("qwen-chat", "models", "uid"), stable=None, candidate="r1", replicas=1,
                           history=(), model_service=None, route=None, now=T0)
    first = plan_rollout(RolloutObserved.of(body), inputs)
    assert [e.reason for e in first.events] == ["InvalidSpec"] and first.status is not None
    body["status"] = first.status
    again = plan_rollout(RolloutObserved.of(body), inputs)
    assert again.events == () and again.status is None
