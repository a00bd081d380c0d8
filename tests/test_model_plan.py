"""The plan half of the SmallModel reconcile (`handlers.model_plan.plan_model`), against a simulated world.

`World` stands in for the API server and the kubelets: it holds the SmallModel body, the objects
the plans applied (keyed by kind and name, with uid, generation and status as the API server would
keep them), this model's pods, other tenants' GPU pods and the nodes. `World.reconcile` plans from
what the world holds and applies the plan the way `handlers.operator.execute` does (apply, delete,
replace the status wholesale, post events); tests then change the world (a Deployment becomes
ready, a node joins, a pod stays Pending, the spec is edited) and look at the next plan.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import itertools
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from pydantic.alias_generators import to_camel

from slmfleet.api.config import OperatorConfig
from slmfleet.api.smallmodel import Placement, SmallModel, SmallModelSpec
from slmfleet.builders import ModelOwner, build_revision_service, revision_of
from slmfleet.builders.applied_hash import APPLIED_HASH, with_applied_hash
from slmfleet.builders.labels import MODEL_LABEL, PLACEMENT_ANNOTATION, REVISION_LABEL
from slmfleet.planning import desired
from slmfleet.planning import model as model_plan
from slmfleet.planning.common import Deletion, EventNote
from slmfleet.planning.desired import LivePodShape, Target
from slmfleet.planning.model import Observed, Plan, plan_model
from slmfleet.planning.placement import hf_config
from slmfleet.sizing.inventory import LiveInventory
from slmfleet.sizing.pools import ready_nodes_from_pools_doc
from slmfleet.weights.facts import WeightsFacts
from tests.sizing_configs import QWEN2_5_0_5B, QWEN2_5_14B
from tests.sizing_nodes import default_fleet, gpu_node, gpu_pod

# A well-formed pinned reference, as the chart renders it.
IMAGE = "docker.io/vllm/vllm-openai:v0.32.0@sha256:" + "5" * 64  # a test value, not the registry's digest
LOADER_IMAGE = "slmfleet/slmfleet:0.1.0@sha256:" + "c" * 64
CONFIG = OperatorConfig.model_validate({"vllmImage": IMAGE, "loaderImage": LOADER_IMAGE})
FAST_PENDING = OperatorConfig.model_validate({"vllmImage": IMAGE, "loaderImage": LOADER_IMAGE, "pendingTimeoutSeconds": 10})

NAME = "qwen-chat"
NAMESPACE = "models"
MODEL_UID = "0e9a6c1f-5d2b-4c8e-9f3a-7b1d2e4c6a80"
DIGEST = "sha256:" + "ab" * 32
NEW_DIGEST = "sha256:" + "cd" * 32
GENERATION = 3  # not 1, so an observedGeneration copied from a default would show

T0 = dt.datetime(2025, 6, 2, 9, 0, 0, tzinfo=dt.UTC)

L4 = "NVIDIA-L4"
L4_MIB = 23034
H100 = "NVIDIA-H100-80GB-HBM3"
MIG_2G = "nvidia.com/mig-2g.10gb|NVIDIA-A100-SXM4-40GB-MIG-2g.10gb|1"
MIG_3G = "nvidia.com/mig-3g.20gb|NVIDIA-A100-SXM4-40GB-MIG-3g.20gb|1"
L4_KEY = f"nvidia.com/gpu|{L4}|1"

SCHEDULER_MESSAGE = "0/2 nodes are available: 2 Insufficient nvidia.com/mig-2g.10gb. preemption: not helpful"

ARCHITECTURE_FIELDS = (
    "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "intermediate_size", "tie_word_embeddings", "max_position_embeddings", "torch_dtype",
)


# --- the simulated world ---------------------------------------------------------------------------


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def rfc3339(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def architecture(hf_config: dict[str, Any]) -> dict[str, Any]:
    """`spec.architecture` (camelCase) from a published config.json."""
    return {to_camel(k): hf_config[k] for k in ARCHITECTURE_FIELDS if k in hf_config}


def model_body(
    *,
    hf_config: dict[str, Any] | None = QWEN2_5_0_5B,
    serving: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    uri: str = "pvc://model-store/qwen2.5-0.5b-instruct",
    digest: str = DIGEST,
    generation: int = GENERATION,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": {"uri": uri, "digest": digest}}
    if hf_config is not None:
        spec["architecture"] = architecture(hf_config)
    if serving is not None:
        spec["serving"] = serving
    if resources is not None:
        spec["resources"] = resources
    return {
        "apiVersion": "slmfleet.io/v1alpha1",
        "kind": "SmallModel",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "uid": MODEL_UID,
            "generation": generation,
            "resourceVersion": "1001",
            "creationTimestamp": rfc3339(T0 - dt.timedelta(hours=1)),
        },
        "spec": spec,
    }


def fleet(*pools: str) -> list[dict[str, Any]]:
    """Nodes of e2e/pools/default.yaml, only those of `pools` when given."""
    nodes = default_fleet()
    if pools:
        nodes = [n for n in nodes if n["metadata"]["labels"]["slmfleet.io/pool"] in pools]
        assert nodes, pools
    return nodes


def h100_node(name: str, count: int) -> dict[str, Any]:
    doc = {"pools": [{"name": name, "nodes": 1, "cpu": 192, "memory": "2048Gi",
                      "gpu": {"product": H100, "memoryMiB": 81559, "count": count, "family": "hopper"}}]}
    return ready_nodes_from_pools_doc(doc)[0]


def revision_pod(dep: dict[str, Any], name: str, *, node: str | None = None,
                 unschedulable_since: dt.datetime | None = None, message: str = SCHEDULER_MESSAGE) -> dict[str, Any]:
    """A pod of a Deployment as the ReplicaSet creates it: the template's labels, annotations and spec."""
    template = dep["spec"]["template"]
    spec = copy.deepcopy(template["spec"])
    if node:
        spec["nodeName"] = node
        status = {"phase": "Running", "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": rfc3339(T0)},
            {"type": "Ready", "status": "False", "lastTransitionTime": rfc3339(T0)},
        ]}
    else:
        since = unschedulable_since or T0
        status = {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
             "lastTransitionTime": rfc3339(since)},
        ]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": f"pod-uid-{name}",
            "labels": copy.deepcopy(template["metadata"]["labels"]),
            "annotations": copy.deepcopy(template["metadata"]["annotations"]),
            "creationTimestamp": rfc3339(T0),
        },
        "spec": spec,
        "status": status,
    }


class World:
    """The API server's view of one SmallModel and its surroundings, and a loop that applies plans."""

    def __init__(self, body: dict[str, Any], nodes: Iterable[dict[str, Any]], config: OperatorConfig = CONFIG) -> None:
        self.body = copy.deepcopy(body)
        self.nodes = [copy.deepcopy(n) for n in nodes]
        self.config = config
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) -> live object
        self.pods: list[dict[str, Any]] = []  # this model's pods
        self.other_pods: list[dict[str, Any]] = []  # other tenants' GPU pods
        self.events: list[EventNote] = []
        self.weights: WeightsFacts | None = None  # what the operator read from the source
        self._uids = itertools.count(1)

    # observing and planning

    def observe(self) -> Observed:
        live = sorted(self.objects.items())
        return Observed.of(
            copy.deepcopy(self.body),
            deployments=tuple(copy.deepcopy(o) for (kind, _), o in live if kind == "Deployment"),
            services=tuple(copy.deepcopy(o) for (kind, _), o in live if kind == "Service"),
            pods=tuple(copy.deepcopy(p) for p in self.pods),
            nodes=tuple(copy.deepcopy(n) for n in self.nodes),
            gpu_pods=tuple(copy.deepcopy(p) for p in (*self.other_pods, *self.pods)),
            weights=self.weights,
        )

    def plan(self, now: dt.datetime = T0) -> Plan:
        return plan_model(self.observe(), self.config, now)

    def apply(self, plan: Plan) -> None:
        for obj in plan.apply:
            assert APPLIED_HASH in obj["metadata"]["annotations"], obj["metadata"]
            key = (obj["kind"], obj["metadata"]["name"])
            live = self.objects.get(key)
            new = copy.deepcopy(obj)
            if live is None:
                new["metadata"]["uid"] = f"{obj['kind'].lower()}-uid-{next(self._uids)}"
                new["metadata"]["generation"] = 1
            else:
                new["metadata"]["uid"] = live["metadata"]["uid"]
                bump = live["spec"] != obj["spec"]
                new["metadata"]["generation"] = live["metadata"]["generation"] + bump
                if "status" in live:
                    new["status"] = live["status"]
            self.objects[key] = new
        for gone in plan.delete:
            live = self.objects.pop((gone.kind, gone.name))
            assert live["metadata"]["uid"] == gone.uid, "deletions carry the uid precondition"
            assert live["apiVersion"] == gone.api_version
        if plan.status is not None:
            self.body["status"] = copy.deepcopy(plan.status)
        self.events.extend(plan.events)

    def reconcile(self, now: dt.datetime = T0) -> Plan:
        plan = self.plan(now)
        self.apply(plan)
        return plan

    def settle(self, now: dt.datetime = T0, rounds: int = 4) -> None:
        for _ in range(rounds):
            if self.reconcile(now).writes == 0:
                return
        raise AssertionError(f"no fixpoint after {rounds} reconciles: {self.plan(now)}")

    # changing the world

    def deployment(self, revision: str | None = None) -> dict[str, Any]:
        return self.objects[("Deployment", f"{NAME}-{revision or self.status['revision']}")]

    def mark_ready(self, revision: str | None = None) -> None:
        """The Deployment controller has rolled the revision out and every replica is ready."""
        dep = self.deployment(revision)
        n = dep["spec"]["replicas"]
        dep["status"] = {"observedGeneration": dep["metadata"]["generation"], "replicas": n, "readyReplicas": n,
                         "updatedReplicas": n, "availableReplicas": n}

    def edit_spec(self, change: Callable[[dict[str, Any]], None]) -> None:
        change(self.body["spec"])
        self.body["metadata"]["generation"] += 1

    # reading the world

    @property
    def status(self) -> dict[str, Any]:
        return self.body.get("status") or {}

    def condition(self, type_: str) -> dict[str, Any]:
        return condition(self.status, type_)

    def kinds_and_names(self) -> set[tuple[str, str]]:
        return set(self.objects)


def condition(status: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    found = [c for c in (status or {}).get("conditions", []) if c["type"] == type_]
    assert len(found) == 1, (type_, status)
    return found[0]


def summary(status: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    """Ready, Progressing and Degraded; WeightsVerified has its own tests."""
    return {c["type"]: (c["status"], c["reason"]) for c in (status or {}).get("conditions", [])
            if c["type"] != "WeightsVerified"}


def weights_condition(status: dict[str, Any] | None) -> tuple[str, str, str]:
    cond = next(c for c in (status or {}).get("conditions", []) if c["type"] == "WeightsVerified")
    return cond["status"], cond["reason"], cond["message"]


def reasons(plan: Plan) -> list[str]:
    return [e.reason for e in plan.events]


def applied(plan: Plan) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in plan.apply}


def spec_revision(body: dict[str, Any]) -> str:
    return revision_of(SmallModelSpec.model_validate(body["spec"]))


def placed(world: World, now: dt.datetime = T0, *, ready: bool = True) -> World:
    """`world` reconciled to a fixpoint, with its revision's Deployment ready when asked."""
    world.settle(now)
    if ready:
        world.mark_ready()
        world.settle(now)
    return world


def pending_world() -> tuple[World, dict[str, Any]]:
    """A 0.5B model placed on a MIG 2g.10gb slice (fallback 3g.20gb), with a fast pending timeout."""
    world = placed(World(model_body(), fleet("a100-40gb-mig", "l4"), FAST_PENDING), ready=False)
    placement = world.status["placement"]
    assert f"{placement['gpuResource']}|{placement['gpuProduct']}|{placement['gpuCount']}" == MIG_2G
    return world, placement


# --- 1. the first reconcile ------------------------------------------------------------------------


def test_first_reconcile_applies_the_revision_and_says_it_waits_for_replicas():
    body = model_body()
    world = World(body, default_fleet())
    plan = world.plan(T0)
    revision = spec_revision(body)
    assert len(revision) == 10

    # One Service, the model's: a revision gets its own only as an HTTPRoute's backend.
    assert applied(plan) == {("Deployment", f"{NAME}-{revision}"), ("Service", NAME)}
    assert plan.delete == ()
    assert plan.requeue_after is None
    for obj in plan.apply:
        meta = obj["metadata"]
        assert meta["namespace"] == NAMESPACE
        assert meta["annotations"][APPLIED_HASH]
        assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in meta["ownerReferences"]] == [
            ("SmallModel", NAME, MODEL_UID, True)
        ]

    status = plan.status
    assert status is not None
    assert status["observedGeneration"] == GENERATION
    assert status["revision"] == status["servingRevision"] == revision
    assert status["endpoint"] == f"http://{NAME}.{NAMESPACE}.svc:8000/v1"
    assert (status["replicas"], status["readyReplicas"]) == (1, 0)
    placement = status["placement"]
    assert placement["summary"] == f"{placement['gpuProduct']} x{placement['gpuCount']}"
    assert placement["reasons"] and all(isinstance(r, str) and r for r in placement["reasons"])
    assert placement["memory"]["totalBytes"] > placement["memory"]["weightsBytes"] > 0
    assert status["fallbacks"] and status["excludedPlacements"] == []

    assert summary(status) == {
        "Ready": ("False", "WaitingForReplicas"),
        "Progressing": ("True", "RollingOut"),
        "Degraded": ("False", "AsExpected"),
    }
    for c in status["conditions"]:
        assert c["observedGeneration"] == GENERATION
        assert c["lastTransitionTime"] == rfc3339(T0)
    assert {k: v for k, v in plan.conditions.items() if k != "WeightsVerified"} == {
        "Ready": "False", "Progressing": "True", "Degraded": "False"}
    assert plan.gpus == {placement["gpuProduct"]: 1}

    # One Event for a new model: where it was placed, naming its first revision.
    assert reasons(plan) == ["Placed"]
    assert all(e.type == "Normal" for e in plan.events)
    placed_event = next(e for e in plan.events if e.reason == "Placed")
    assert placed_event.message.startswith(f"revision {revision} {placement['summary']}")


def test_the_applied_objects_carry_the_placement():
    plan = World(model_body(), default_fleet()).plan(T0)
    placement = plan.status["placement"]
    key = f"{placement['gpuResource']}|{placement['gpuProduct']}|{placement['gpuCount']}"
    revision = plan.status["revision"]
    objects = {(o["kind"], o["metadata"]["name"]): o for o in plan.apply}

    dep = objects[("Deployment", f"{NAME}-{revision}")]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["selector"]["matchLabels"] == {MODEL_LABEL: NAME, REVISION_LABEL: revision}
    template = dep["spec"]["template"]
    assert template["metadata"]["annotations"][PLACEMENT_ANNOTATION] == key
    assert template["metadata"]["labels"][REVISION_LABEL] == revision
    container = template["spec"]["containers"][0]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"] == {placement["gpuResource"]: "1"}
    args = container["args"]
    assert args[args.index("--max-model-len") + 1] == str(placement["maxModelLen"])
    assert args[args.index("--gpu-memory-utilization") + 1] == placement["gpuMemoryUtilization"]
    terms = template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expressions = {(e["key"], e["values"][0]) for e in terms["nodeSelectorTerms"][0]["matchExpressions"]}
    assert expressions == set(placement["nodeSelector"].items())

    assert objects[("Service", NAME)]["spec"]["selector"] == {MODEL_LABEL: NAME, REVISION_LABEL: revision}


# --- 2. idempotence ----------------------------------------------------------------------------------


def test_an_applied_plan_needs_no_second_write_even_before_the_pods_are_ready():
    world = World(model_body(), default_fleet())
    assert world.reconcile(T0).writes > 0
    again = world.plan(at(5))
    assert again == Plan(conditions=again.conditions, gpus=again.gpus)
    assert again.writes == 0


def test_a_ready_deployment_makes_the_model_ready_and_then_nothing_is_written():
    world = World(model_body(), default_fleet())
    world.reconcile(T0)
    revision = world.status["revision"]
    world.mark_ready(revision)

    plan = world.reconcile(at(30))
    assert plan.apply == () and plan.delete == ()
    assert summary(plan.status) == {
        "Ready": ("True", "Serving"),
        "Progressing": ("False", "Complete"),
        "Degraded": ("False", "AsExpected"),
    }
    assert plan.status["readyReplicas"] == 1 and plan.status["servingRevision"] == revision
    # A new model's first readiness is no decision: its Placed Event said where it runs.
    assert plan.events == ()
    assert {k: v for k, v in plan.conditions.items() if k != "WeightsVerified"} == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
    }
    # Only the conditions that changed moved their transition time.
    assert world.condition("Ready")["lastTransitionTime"] == rfc3339(at(30))
    assert world.condition("Progressing")["lastTransitionTime"] == rfc3339(at(30))
    assert world.condition("Degraded")["lastTransitionTime"] == rfc3339(T0)

    status_before = copy.deepcopy(world.status)
    for now in (at(30), at(31), at(3600), T0 + dt.timedelta(days=9)):
        plan = world.plan(now)
        assert (plan.apply, plan.delete, plan.status, plan.events) == ((), (), None, ())
        assert plan.writes == 0
        assert plan.requeue_after is None
        assert {k: v for k, v in plan.conditions.items() if k != "WeightsVerified"} == {
            "Ready": "True",
            "Progressing": "False",
            "Degraded": "False",
        }
    assert world.status == status_before


def test_a_deployment_that_has_not_observed_its_generation_is_not_ready():
    world = World(model_body(), default_fleet())
    world.reconcile(T0)
    world.mark_ready()
    world.deployment()["status"]["observedGeneration"] = 0  # the controller has not caught up yet
    plan = world.plan(at(1))
    assert plan.conditions["Ready"] == "False"
    assert summary(plan.status or world.status)["Ready"] == ("False", "WaitingForReplicas")


def test_a_deployment_changed_behind_the_operators_back_is_applied_again():
    world = placed(World(model_body(), default_fleet()))
    dep = world.deployment()
    dep["metadata"]["annotations"][APPLIED_HASH] = "0000000000000000"
    plan = world.plan(at(10))
    assert applied(plan) == {("Deployment", dep["metadata"]["name"])}
    # And what is live does not run the desired template, so the model is not Ready on it.
    assert plan.conditions["Ready"] == "False"


def test_a_field_the_operator_sets_changed_by_another_writer_is_applied_again_the_rest_is_left():
    """A `kubectl scale` or an edit of the args keeps the applied hash: the fields the operator sets
    are compared too, so it takes them back; what the API server or others add changes nothing."""
    world = placed(World(model_body(), default_fleet()))
    dep = world.deployment()
    name = dep["metadata"]["name"]
    dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3"  # the controller's own
    dep["metadata"].setdefault("labels", {})["team"] = "someone-else"
    assert applied(world.plan(at(10))) == set()
    replicas, dep["spec"]["replicas"] = dep["spec"]["replicas"], 3
    assert applied(world.plan(at(11))) == {("Deployment", name)}
    dep["spec"]["replicas"] = replicas
    assert applied(world.plan(at(12))) == set()
    container = dep["spec"]["template"]["spec"]["containers"][0]
    container["args"] = [*container["args"], "--enforce-eager"]
    assert applied(world.plan(at(13))) == {("Deployment", name)}


# --- 3. small models go on small devices ---------------------------------------------------------------


def test_a_small_model_gets_a_mig_slice_or_an_l4_never_a_whole_big_gpu():
    plan = World(model_body(), default_fleet()).plan(T0)
    placement = plan.status["placement"]
    resource, product = placement["gpuResource"], placement["gpuProduct"]
    assert resource.startswith("nvidia.com/mig-") or product == L4
    assert "H100" not in product
    assert not (resource == "nvidia.com/gpu" and "A100" in product)
    assert placement["gpuCount"] == 1 and placement["tensorParallelSize"] == 1
    assert placement["maxModelLen"] == 32768
    # On this fleet it is the 2g.10gb slice: the 1g.5gb one holds a shorter context only.
    assert f"{resource}|{product}|1" == MIG_2G


def test_without_mig_a_small_model_gets_an_l4():
    plan = World(model_body(resources={"allowMig": False}), default_fleet()).plan(T0)
    placement = plan.status["placement"]
    assert (placement["gpuResource"], placement["gpuProduct"]) == ("nvidia.com/gpu", L4)
    assert placement["nodeSelector"] == {"nvidia.com/gpu.product": L4}


# --- 4. no fit -------------------------------------------------------------------------------------------


def no_fit_body() -> dict[str, Any]:
    return model_body(
        hf_config=QWEN2_5_14B,
        serving={"maxModelLen": 32768},
        resources={"gpuProducts": [L4], "gpuCount": 1},
        uri="pvc://model-store/qwen2.5-14b",
    )


def test_a_model_that_fits_nowhere_is_degraded_nofit_and_nothing_is_applied():
    world = World(no_fit_body(), default_fleet())
    plan = world.reconcile(T0)
    assert plan.apply == () and plan.delete == ()
    assert summary(plan.status) == {
        "Degraded": ("True", "NoFit"),
        "Ready": ("False", "NoFit"),
        "Progressing": ("False", "NoFit"),
    }
    message = world.condition("Degraded")["message"]
    assert "needs" in message and "GiB" in message
    assert all(c["observedGeneration"] == GENERATION for c in world.status["conditions"])
    assert "placement" not in world.status and world.status["fallbacks"] == []
    assert world.status["revision"] == spec_revision(world.body)
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "NoFit")]
    assert plan.events[0].message == message
    assert plan.gpus == {}
    assert {k: v for k, v in plan.conditions.items() if k != "WeightsVerified"} == {
        "Degraded": "True",
        "Ready": "False",
        "Progressing": "False",
    }

    for now in (T0, at(60), at(86400)):
        again = world.plan(now)
        assert again.writes == 0, again
    assert world.objects == {}


# --- 5. capacity appears ---------------------------------------------------------------------------------


def test_a_node_that_fits_places_a_model_that_did_not_fit():
    body = model_body(
        hf_config=QWEN2_5_14B,
        serving={"maxModelLen": 32768},
        resources={"gpuProducts": [L4]},
        uri="pvc://model-store/qwen2.5-14b",
    )
    world = World(body, fleet("l4"))  # single-GPU L4 nodes only: 14B at 32k needs tensor parallelism
    world.settle(T0)
    assert world.condition("Degraded")["reason"] == "NoFit"
    assert world.objects == {}

    world.nodes.append(gpu_node("l4x4-0", L4, L4_MIB, 4))
    plan = world.plan(at(120))
    revision = world.status["revision"]
    assert ("Deployment", f"{NAME}-{revision}") in applied(plan)
    assert summary(plan.status)["Degraded"] == ("False", "AsExpected")
    assert summary(plan.status)["Ready"] == ("False", "WaitingForReplicas")
    placement = plan.status["placement"]
    assert placement["gpuProduct"] == L4 and placement["gpuCount"] > 1
    assert placement["tensorParallelSize"] == placement["gpuCount"]
    assert "Placed" in reasons(plan) and "NewRevision" not in reasons(plan)  # the revision was already recorded
    # Degraded's transition time moves (True -> False).
    assert condition(plan.status, "Degraded")["lastTransitionTime"] == rfc3339(at(120))
    world.apply(plan)
    assert world.plan(at(121)).writes == 0


def test_a_freed_gpu_places_a_model_that_found_every_gpu_busy():
    nodes = [gpu_node("l4-a", L4, L4_MIB, 1), gpu_node("l4-b", L4, L4_MIB, 1)]
    world = World(model_body(), nodes)
    world.other_pods = [gpu_pod("l4-a", 1, uid="other-a"), gpu_pod("l4-b", 1, uid="other-b")]
    plan = world.reconcile(T0)
    assert plan.apply == ()
    assert world.condition("Degraded")["reason"] == "NoFit"
    assert "no free GPUs" in world.condition("Degraded")["message"]

    world.other_pods[1]["status"]["phase"] = "Succeeded"  # finished pods hold no GPUs
    plan = world.plan(at(30))
    assert ("Deployment", f"{NAME}-{world.status['revision']}") in applied(plan)
    assert plan.status["placement"]["gpuProduct"] == L4


# --- 6. stickiness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ready", [True, False], ids=["ready", "rolling-out"])
def test_a_placement_stays_when_better_gpus_join(ready):
    world = placed(World(model_body(), fleet("l4")), ready=ready)
    assert world.status["placement"]["gpuProduct"] == L4
    before = copy.deepcopy(world.objects)

    world.nodes += fleet("a100-40gb-mig", "h100-80gb")
    # A fresh sizing against this inventory would choose a MIG slice, so staying is a decision.
    fresh = World(model_body(), world.nodes).plan(T0).status["placement"]
    assert fresh["gpuProduct"] != L4

    for now in (at(60), at(3600)):
        plan = world.plan(now)
        assert plan.apply == () and plan.writes == 0
    assert world.objects == before


def test_the_models_own_pods_do_not_count_against_its_placement():
    world = World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1)])
    world.settle(T0)
    # Its pod holds the only L4 while vLLM loads; the Deployment is not ready yet.
    world.pods = [revision_pod(world.deployment(), f"{NAME}-pod-1", node="l4-a")]
    plan = world.plan(at(60))
    assert plan.writes == 0
    assert world.condition("Degraded")["status"] == "False"


def test_a_placement_that_lost_its_gpus_before_becoming_ready_is_sized_again():
    world = World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1), h100_node("h100", 1)])
    world.settle(T0)
    assert world.status["placement"]["gpuProduct"] == L4
    old_dep = copy.deepcopy(world.deployment())

    world.other_pods = [gpu_pod("l4-a", 1, uid="someone-else")]  # took the L4 first
    plan = world.plan(at(30))
    assert plan.status["placement"]["gpuProduct"] == H100
    # Same revision, so the same Deployment, updated in place.
    assert applied(plan) == {("Deployment", old_dep["metadata"]["name"])}
    assert "Placed" in reasons(plan)
    assert plan.status["revision"] == world.status["revision"]


def test_a_placement_whose_pod_is_bound_stays_though_not_ready_and_its_gpus_look_taken():
    # A busy control plane: the pod is on the L4 and loading, the Deployment does not say Ready yet,
    # and another model's Deployment, its pod not bound yet, reserves an L4 in the operator's inventory.
    nodes = [gpu_node("l4-a", L4, L4_MIB, 1), h100_node("h100", 1)]
    world = World(model_body(), nodes)
    world.settle(T0)
    world.pods = [revision_pod(world.deployment(), f"{NAME}-pod-1", node="l4-a")]
    live = LiveInventory()
    for node in nodes:
        live.set_node(node["metadata"]["name"], node)
    for pod in world.pods:
        live.set_pod(pod["metadata"]["uid"], pod)
    live.set_reservations(("models", "other"), {"rev": {("nvidia.com/gpu", L4): 1}})

    def plan(now: dt.datetime) -> Plan:
        return plan_model(dataclasses.replace(world.observe(), cluster=live), world.config, now)

    assert plan(at(30)).writes == 0
    # Its pod gone (evicted), nothing holds the L4 for it: sized again, on what is free.
    world.pods = []
    live.set_pod("pod-uid-" + f"{NAME}-pod-1", None)
    assert plan(at(31)).status["placement"]["gpuProduct"] == H100


def test_a_ready_placement_stays_even_when_its_gpus_look_taken():
    world = placed(World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1), h100_node("h100", 1)]))
    world.other_pods = [gpu_pod("l4-a", 1, uid="someone-else")]
    assert world.plan(at(30)).writes == 0


# --- 7. pending fallback -------------------------------------------------------------------------------------


def test_a_pending_pod_within_the_timeout_keeps_the_placement_and_asks_for_a_requeue():
    world, placement = pending_world()
    since = at(100)
    world.pods = [revision_pod(world.deployment(), f"{NAME}-pod-1", unschedulable_since=since)]
    plan = world.plan(since + dt.timedelta(seconds=5))
    assert plan.writes == 0
    assert plan.requeue_after == pytest.approx(6, abs=0.01)
    assert world.status["placement"] == placement


def test_a_pod_pending_past_the_timeout_moves_the_model_to_its_next_fallback():
    world, placement = pending_world()
    first_fallback = world.status["fallbacks"][0]
    dep_name = world.deployment()["metadata"]["name"]
    since = at(100)
    world.pods = [revision_pod(world.deployment(), f"{NAME}-pod-1", unschedulable_since=since)]

    plan = world.plan(since + dt.timedelta(seconds=11))
    new = plan.status["placement"]
    assert (new["gpuResource"], new["gpuProduct"], new["gpuCount"]) == (
        first_fallback["gpuResource"],
        first_fallback["gpuProduct"],
        first_fallback["gpuCount"],
    )
    assert f"{new['gpuResource']}|{new['gpuProduct']}|{new['gpuCount']}" == MIG_3G

    excluded = plan.status["excludedPlacements"]
    assert [e["key"] for e in excluded] == [MIG_2G]
    assert "Pending" in excluded[0]["reason"] and SCHEDULER_MESSAGE in excluded[0]["reason"]
    assert placement["summary"] in excluded[0]["reason"]

    fallback_events = [e for e in plan.events if e.reason == "PlacementFallback"]
    assert len(fallback_events) == 1 and fallback_events[0].type == "Warning"
    assert new["summary"] in fallback_events[0].message
    assert "Placed" not in reasons(plan) and "NewRevision" not in reasons(plan)
    assert plan.requeue_after is None
    assert summary(plan.status)["Degraded"] == ("False", "AsExpected")
    assert plan.status["revision"] == world.status["revision"]

    # The same revision's Deployment, rebuilt for the new placement.
    assert applied(plan) == {("Deployment", dep_name)}
    dep = next(o for o in plan.apply if o["kind"] == "Deployment")
    template = dep["spec"]["template"]
    assert template["metadata"]["annotations"][PLACEMENT_ANNOTATION] == MIG_3G
    assert template["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/mig-3g.20gb": "1"}

    # The old pod is still Pending, but it was built for the placement given up on.
    world.apply(plan)
    for now in (since + dt.timedelta(seconds=12), since + dt.timedelta(seconds=600)):
        again = world.plan(now)
        assert again.writes == 0 and again.requeue_after is None
    assert world.status["excludedPlacements"] == excluded


@pytest.mark.parametrize("kind", ["other-placement", "other-revision", "scheduled", "not-unschedulable"])
def test_pending_pods_that_are_not_the_current_placements_do_not_move_it(kind):
    world, placement = pending_world()
    since = at(100)
    pod = revision_pod(world.deployment(), f"{NAME}-pod-1", unschedulable_since=since)
    if kind == "other-placement":
        pod["metadata"]["annotations"][PLACEMENT_ANNOTATION] = L4_KEY
    elif kind == "other-revision":
        pod["metadata"]["labels"][REVISION_LABEL] = "0000000000"
    elif kind == "scheduled":
        pod["spec"]["nodeName"] = "a100-40gb-mig-0"  # bound, e.g. pulling the image
    else:
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": rfc3339(since)}]
    world.pods = [pod]
    plan = world.plan(since + dt.timedelta(seconds=11))
    assert plan.writes == 0
    assert plan.requeue_after is None
    assert world.status["placement"] == placement


def test_the_oldest_pending_pod_of_the_placement_counts():
    world, _ = pending_world()
    dep = world.deployment()
    world.pods = [
        revision_pod(dep, f"{NAME}-pod-new", unschedulable_since=at(108)),
        revision_pod(dep, f"{NAME}-pod-old", unschedulable_since=at(100)),
    ]
    assert world.plan(at(105)).requeue_after == pytest.approx(6)
    assert world.plan(at(111)).status["excludedPlacements"][0]["key"] == MIG_2G


def test_pending_on_the_only_placement_that_fits_stays_there_and_says_so():
    world = placed(World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1)], FAST_PENDING), ready=False)
    assert world.status["fallbacks"] == []
    dep_before = copy.deepcopy(world.deployment())
    world.pods = [revision_pod(world.deployment(), f"{NAME}-pod-1", unschedulable_since=at(100))]
    plan = world.reconcile(at(111))
    assert plan.apply == () and plan.delete == ()
    assert world.deployment() == dep_before
    assert [e["key"] for e in world.status["excludedPlacements"]] == [L4_KEY]
    assert world.status["placement"]["gpuProduct"] == L4
    assert summary(world.status)["Degraded"] == ("True", "PodsPending")
    assert summary(world.status)["Ready"] == ("False", "WaitingForReplicas")
    assert SCHEDULER_MESSAGE in world.condition("Degraded")["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "PodsPending")]
    # Said once: no flapping, no further writes while the pod stays Pending.
    for now in (at(112), at(1000)):
        again = world.plan(now)
        assert again.writes == 0 and again.requeue_after is None

    # Once the pod schedules and the revision is ready, the model is no longer degraded.
    world.pods = [revision_pod(world.deployment(), f"{NAME}-pod-1", node="l4-a")]
    world.mark_ready()
    plan = world.reconcile(at(1100))
    assert summary(plan.status)["Degraded"] == ("False", "AsExpected")
    assert summary(plan.status)["Ready"] == ("True", "Serving")


def test_a_ready_model_on_a_placement_once_given_up_on_stays_when_other_gpus_join():
    world = placed(World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1)], FAST_PENDING), ready=False)
    world.pods = [revision_pod(world.deployment(), f"{NAME}-pod-1", unschedulable_since=at(100))]
    world.reconcile(at(111))
    world.pods = [revision_pod(world.deployment(), f"{NAME}-pod-1", node="l4-a")]
    world.mark_ready()
    world.settle(at(200))
    assert world.condition("Ready")["status"] == "True"

    world.nodes.append(h100_node("h100", 1))
    plan = world.plan(at(300))
    assert plan.apply == ()


# --- 8. a spec change is a new revision --------------------------------------------------------------------------


def new_digest(spec: dict[str, Any]) -> None:
    spec["source"]["digest"] = NEW_DIGEST


def legacy_revision_service(world: World, revision: str) -> dict[str, Any]:
    """The revision Service an earlier release made for every revision, as it is live."""
    owner = ModelOwner(name=NAME, namespace=NAMESPACE, uid=MODEL_UID)
    svc = with_applied_hash(build_revision_service(owner, revision, world.config))
    svc["metadata"]["uid"] = f"service-uid-legacy-{revision}"
    svc["metadata"]["generation"] = 1
    world.objects[("Service", svc["metadata"]["name"])] = svc
    return svc


def test_a_new_revision_replaces_the_serving_one_without_a_gap():
    world = placed(World(model_body(), fleet("a100-40gb-mig", "l4")))
    old = world.status["revision"]
    old_dep = world.objects[("Deployment", f"{NAME}-{old}")]
    # An earlier release gave every revision a Service: it retires with its revision.
    old_svc = legacy_revision_service(world, old)

    world.edit_spec(new_digest)
    plan = world.reconcile(at(60))
    new = plan.status["revision"]
    assert new != old and new == spec_revision(world.body)
    assert plan.status["observedGeneration"] == GENERATION + 1
    assert applied(plan) == {("Deployment", f"{NAME}-{new}")}
    assert plan.delete == ()
    assert world.objects[("Service", NAME)]["spec"]["selector"][REVISION_LABEL] == old
    assert plan.status["servingRevision"] == old
    assert summary(plan.status) == {
        "Degraded": ("False", "AsExpected"),
        "Ready": ("True", "ServingPreviousRevision"),
        "Progressing": ("True", "RollingOut"),
    }
    assert all(c["observedGeneration"] == GENERATION + 1 for c in plan.status["conditions"])
    assert "NewRevision" in reasons(plan) and "RevisionRetired" not in reasons(plan)
    assert new in next(e for e in plan.events if e.reason == "NewRevision").message

    # While the new revision is not ready, nothing more happens; the old one keeps serving.
    for now in (at(61), at(900)):
        assert world.plan(now).writes == 0
    assert ("Deployment", f"{NAME}-{old}") in world.objects

    world.mark_ready(new)
    plan = world.reconcile(at(1000))
    assert {(d.kind, d.name, d.uid) for d in plan.delete} == {
        ("Deployment", f"{NAME}-{old}", old_dep["metadata"]["uid"]),
        ("Service", f"{NAME}-{old}", old_svc["metadata"]["uid"]),
    }
    assert all(isinstance(d, Deletion) for d in plan.delete)
    retired = [e for e in plan.events if e.reason == "RevisionRetired"]
    assert len(retired) == 1 and f"{NAME}-{old}" in retired[0].message
    assert applied(plan) == {("Service", NAME)}
    assert world.objects[("Service", NAME)]["spec"]["selector"] == {MODEL_LABEL: NAME, REVISION_LABEL: new}
    assert plan.status["servingRevision"] == new
    assert summary(plan.status)["Ready"] == ("True", "Serving")
    assert summary(plan.status)["Progressing"] == ("False", "Complete")

    assert world.kinds_and_names() == {("Deployment", f"{NAME}-{new}"), ("Service", NAME)}
    assert world.plan(at(1001)).writes == 0


def test_objects_already_being_deleted_are_not_deleted_again():
    world = placed(World(model_body(), fleet("a100-40gb-mig", "l4")))
    old = world.status["revision"]
    legacy_revision_service(world, old)
    world.edit_spec(new_digest)
    world.reconcile(at(60))
    world.mark_ready()
    # The old revision's objects are terminating already (a finalizer holds them).
    for kind in ("Deployment", "Service"):
        world.objects[(kind, f"{NAME}-{old}")]["metadata"]["deletionTimestamp"] = rfc3339(at(70))
    plan = world.plan(at(80))
    assert plan.delete == ()
    assert "RevisionRetired" not in reasons(plan)
    assert plan.status["servingRevision"] == world.status["revision"]


def test_a_spec_change_clears_the_excluded_placements():
    world, _ = pending_world()
    old_revision = world.status["revision"]
    world.pods = [revision_pod(world.deployment(), f"{NAME}-pod-1", unschedulable_since=at(100))]
    world.reconcile(at(111))
    assert [e["key"] for e in world.status["excludedPlacements"]] == [MIG_2G]

    world.edit_spec(new_digest)
    plan = world.reconcile(at(200))
    assert plan.status["excludedPlacements"] == []
    # Sized afresh: the slice given up on under the old spec is allowed again.
    new = plan.status["placement"]
    assert f"{new['gpuResource']}|{new['gpuProduct']}|{new['gpuCount']}" == MIG_2G
    assert plan.status["revision"] != old_revision
    assert ("Deployment", f"{NAME}-{plan.status['revision']}") in applied(plan)


def test_scaling_keeps_the_revision_and_resizes_its_deployment():
    world = placed(World(model_body(), fleet("a100-40gb-mig", "l4")))
    revision = world.status["revision"]
    world.edit_spec(lambda spec: spec.setdefault("serving", {}).update(replicas=2))
    plan = world.reconcile(at(60))
    assert plan.status["revision"] == revision
    assert applied(plan) == {("Deployment", f"{NAME}-{revision}")}
    assert world.deployment()["spec"]["replicas"] == 2
    assert "NewRevision" not in reasons(plan) and plan.delete == ()
    assert summary(plan.status)["Ready"] == ("False", "WaitingForReplicas")
    assert plan.gpus == {plan.status["placement"]["gpuProduct"]: 2}


def test_scaling_to_zero_is_not_ready_and_not_progressing():
    world = placed(World(model_body(), fleet("l4")))
    world.edit_spec(lambda spec: spec.setdefault("serving", {}).update(replicas=0))
    plan = world.reconcile(at(60))
    assert world.deployment()["spec"]["replicas"] == 0
    assert summary(plan.status) == {
        "Degraded": ("False", "AsExpected"),
        "Ready": ("False", "ScaledToZero"),
        "Progressing": ("False", "Complete"),
    }


def test_a_previous_revision_that_never_became_ready_does_not_make_the_model_ready():
    world = placed(World(model_body(), fleet("l4")), ready=False)  # revision 1 never gets ready
    world.edit_spec(new_digest)
    plan = world.reconcile(at(60))
    assert plan.conditions["Ready"] == "False"


# --- 9. what cannot be served -------------------------------------------------------------------------------------


def test_a_model_without_architecture_is_degraded_architecture_unknown():
    world = World(model_body(hf_config=None), default_fleet())
    plan = world.reconcile(T0)
    assert plan.apply == () and plan.delete == ()
    assert summary(plan.status) == {
        "Degraded": ("True", "ArchitectureUnknown"),
        "Ready": ("False", "ArchitectureUnknown"),
        "Progressing": ("False", "ArchitectureUnknown"),
    }
    assert "spec.architecture" in world.condition("Degraded")["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "ArchitectureUnknown")]
    assert "placement" not in world.status
    assert world.plan(at(60)).writes == 0


@pytest.mark.parametrize(
    "uri,says",
    [
        ("pvc://model-store/../etc", ".."),
    ],
)
def test_a_source_that_cannot_be_mounted_is_degraded_source_not_supported(uri, says):
    world = World(model_body(uri=uri), default_fleet())
    plan = world.reconcile(T0)
    assert plan.apply == () and plan.delete == ()
    assert summary(plan.status)["Degraded"] == ("True", "SourceNotSupported")
    assert summary(plan.status)["Ready"] == ("False", "SourceNotSupported")
    assert summary(plan.status)["Progressing"] == ("False", "SourceNotSupported")
    assert says in world.condition("Degraded")["message"]
    assert ("Warning", "SourceNotSupported") in [(e.type, e.reason) for e in plan.events]
    assert world.plan(at(60)).writes == 0
    assert world.objects == {}


def test_an_unsized_context_is_degraded_invalid_architecture():
    # The CRD's CEL rule rejects this; objects stored before that rule still reach the operator.
    body = model_body(serving={"maxModelLen": 65536})  # beyond the model's 32768 positions
    plan = World(body, default_fleet()).plan(T0)
    assert plan.apply == ()
    assert summary(plan.status)["Degraded"] == ("True", "InvalidArchitecture")
    assert "65536" in condition(plan.status, "Degraded")["message"]


def test_a_body_that_does_not_validate_is_degraded_invalid_spec():
    body = model_body()
    del body["spec"]["source"]
    world = World(body, default_fleet())
    plan = world.reconcile(T0)
    assert plan.apply == () and plan.delete == ()
    assert summary(plan.status) == {
        "Degraded": ("True", "InvalidSpec"),
        "Ready": ("False", "InvalidSpec"),
        "Progressing": ("False", "InvalidSpec"),
    }
    assert "source" in world.condition("Degraded")["message"]
    assert world.status["observedGeneration"] == GENERATION
    assert world.plan(at(60)).writes == 0


def test_a_model_that_is_fixed_recovers_from_degraded():
    world = World(model_body(hf_config=None), default_fleet())
    world.settle(T0)
    world.edit_spec(lambda spec: spec.update(architecture=architecture(QWEN2_5_0_5B)))
    plan = world.reconcile(at(60))
    assert summary(plan.status)["Degraded"] == ("False", "AsExpected")
    assert ("Deployment", f"{NAME}-{plan.status['revision']}") in applied(plan)
    assert "Placed" in reasons(plan)


# --- 10. determinism ------------------------------------------------------------------------------------------------


def worlds_in_every_state() -> list[World]:
    first = World(model_body(), default_fleet())
    serving = placed(World(model_body(), default_fleet()))
    rolling = placed(World(model_body(), fleet("a100-40gb-mig", "l4")))
    rolling.edit_spec(new_digest)
    rolling.reconcile(at(60))
    no_fit = World(no_fit_body(), default_fleet())
    pending, _ = pending_world()
    pending.pods = [revision_pod(pending.deployment(), f"{NAME}-pod-1", unschedulable_since=at(100))]
    return [first, serving, rolling, no_fit, pending]


@pytest.mark.parametrize("index", range(5), ids=["first", "serving", "rolling", "no-fit", "pending"])
def test_the_same_observation_gives_the_same_plan(index):
    world = worlds_in_every_state()[index]
    now = at(111)
    obs = world.observe()
    untouched = copy.deepcopy(obs)
    first = plan_model(obs, world.config, now)
    assert obs == untouched, "planning must not change what it observed"
    assert plan_model(obs, world.config, now) == first
    assert plan_model(copy.deepcopy(obs), world.config, now) == first
    # Nor does the order in which the watches delivered the nodes and pods matter.
    shuffled = list(obs.nodes)
    random.Random(index).shuffle(shuffled)
    reordered = dataclasses.replace(obs, deployments=obs.deployments[::-1], services=obs.services[::-1],
                                    pods=obs.pods[::-1], nodes=tuple(shuffled), gpu_pods=obs.gpu_pods[::-1])
    assert plan_model(reordered, world.config, now) == first


def test_pods_waiting_for_a_claim_do_not_move_the_placement():
    world, _ = pending_world()
    pod = revision_pod(world.deployment(), f"{NAME}-pod-1", unschedulable_since=at(100))
    for cond in pod["status"]["conditions"]:
        cond["message"] = "0/18 nodes are available: pod has unbound immediate PersistentVolumeClaims."
    world.pods = [pod]
    before = world.status["placement"]
    plan = world.reconcile(at(500))
    assert plan.status is None or plan.status["placement"] == before
    assert "PlacementFallback" not in reasons(plan)


def loader_status(exit_code: int, message: str = "", finished: dt.datetime | None = None) -> dict:
    done: dict[str, Any] = {"exitCode": exit_code, "message": message}
    if finished is not None:
        done["finishedAt"] = rfc3339(finished)
    return {"name": "load-weights", "state": {"terminated": done}, "lastState": {}}


def loaded_world(finished: dt.datetime) -> World:
    """A placed model whose one pod's loader verified the weights at `finished`; not ready yet."""
    world = placed(World(model_body(), default_fleet()), ready=False)
    pod = revision_pod(world.deployment(), f"{NAME}-pod-1")
    pod["status"]["initContainerStatuses"] = [loader_status(0, finished=finished)]
    world.pods = [pod]
    return world


def test_a_verification_alone_waits_for_the_ready_that_follows_it():
    world = loaded_world(finished=at(100))
    plan = world.reconcile(at(105))
    assert plan.writes == 0
    assert plan.requeue_after == pytest.approx(model_plan.VERIFIED_HOLD_SECONDS - 5)
    assert weights_condition(world.status)[:2] == ("Unknown", "Pending")

    world.mark_ready()
    plan = world.reconcile(at(110))
    assert weights_condition(plan.status)[:2] == ("True", "Verified")
    assert summary(plan.status)["Ready"] == ("True", "Serving")
    assert plan.events == ()  # the first readiness (see above); the verification is in the condition
    assert world.plan(at(200)).writes == 0


def test_a_slow_server_gets_its_verification_written_when_the_hold_ends():
    world = loaded_world(finished=at(100))
    assert world.reconcile(at(100 + model_plan.VERIFIED_HOLD_SECONDS - 1)).writes == 0
    plan = world.reconcile(at(100 + model_plan.VERIFIED_HOLD_SECONDS))
    assert weights_condition(plan.status)[:2] == ("True", "Verified")
    assert summary(plan.status)["Ready"] == ("False", "WaitingForReplicas")
    assert plan.events == ()  # a verification that passed is in the condition, not an Event


def test_pods_ready_before_their_deployment_says_so_hold_the_verification_longer():
    world = loaded_world(finished=at(100))
    [pod] = world.pods
    pod["spec"]["nodeName"] = "l4-a"
    pod["status"].update(phase="Running", conditions=[{"type": "Ready", "status": "True"}])
    plan = world.reconcile(at(100 + model_plan.VERIFIED_HOLD_SECONDS + 60))
    assert plan.writes == 0  # only the Deployment controller is late
    assert plan.requeue_after == pytest.approx(
        model_plan.VERIFIED_HOLD_PODS_READY_SECONDS - model_plan.VERIFIED_HOLD_SECONDS - 60)
    world.mark_ready()
    plan = world.reconcile(at(200))
    assert weights_condition(plan.status)[:2] == ("True", "Verified") and summary(plan.status)["Ready"][0] == "True"

    late = loaded_world(finished=at(100))
    late.pods[0]["spec"]["nodeName"] = "l4-a"
    late.pods[0]["status"].update(phase="Running", conditions=[{"type": "Ready", "status": "True"}])
    plan = late.reconcile(at(100 + model_plan.VERIFIED_HOLD_PODS_READY_SECONDS))
    assert weights_condition(plan.status)[:2] == ("True", "Verified")  # the hold has an end


def test_a_model_ready_again_after_it_served_says_so_in_an_event():
    world = placed(World(model_body(), default_fleet()))
    assert summary(world.status)["Ready"] == ("True", "Serving")
    world.deployment()["status"].update(readyReplicas=0, availableReplicas=0)
    plan = world.reconcile(at(60))
    assert summary(plan.status)["Ready"][0] == "False"
    world.mark_ready()
    plan = world.reconcile(at(120))
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "Ready")]


def test_weights_verified_follows_the_loader_init_containers():
    world = placed(World(model_body(), default_fleet()), ready=False)
    assert weights_condition(world.status)[:2] == ("Unknown", "Pending")
    ok = revision_pod(world.deployment(), f"{NAME}-pod-1")
    ok["status"]["initContainerStatuses"] = [loader_status(0)]
    world.pods = [ok]
    plan = world.reconcile(at(10))
    assert weights_condition(world.status)[:2] == ("True", "Verified")
    assert "verified every file" in weights_condition(world.status)[2] and plan.events == ()
    assert world.plan(at(20)).writes == 0

    # A new pod finds a file changed under the pin: the verdict turns, naming the file.
    bad = revision_pod(world.deployment(), f"{NAME}-pod-2")
    bad["status"]["initContainerStatuses"] = [loader_status(11, "model.safetensors: sha256 expected aa, got bb")]
    world.pods = [ok, bad]
    plan = world.reconcile(at(30))
    status, reason, message = weights_condition(world.status)
    assert (status, reason) == ("False", "FileMismatch")
    assert "model.safetensors" in message and "pod-2" in message
    assert ("Warning", "FileMismatch") in [(e.type, e.reason) for e in plan.events]
    assert world.plan(at(40)).writes == 0


def test_weights_read_before_any_pod_decide_refusals_and_sizing():
    facts = WeightsFacts(
        digest=DIGEST,
        problem="DigestMismatch",
        message="manifest at s3://m/q/ has digest sha256:11…, not the pinned sha256:22…",
    )
    world = World(model_body(), default_fleet())
    world.weights = facts
    plan = world.reconcile(T0)
    assert plan.apply == ()
    assert summary(plan.status)["Degraded"] == ("True", "DigestMismatch")
    assert weights_condition(plan.status)[:2] == ("False", "DigestMismatch")
    assert reasons(plan).count("DigestMismatch") == 1  # one Event, not one per condition

    # Exact bytes from the headers replace the estimate.
    world = World(model_body(), default_fleet())
    world.weights = WeightsFacts(digest=DIGEST, weights_bytes=3 * 2**30)
    plan = world.reconcile(T0)
    assert plan.status["placement"]["memory"]["weightsBytes"] == 3 * 2**30


def test_history_records_each_revision_that_served():
    world = placed(World(model_body(), default_fleet()))
    [first] = world.status["history"]
    assert first["outcome"] == "Serving" and first["digest"] == DIGEST
    world.edit_spec(new_digest)
    world.settle(at(100))
    world.mark_ready(world.status["revision"])
    world.settle(at(110))
    history = world.status["history"]
    assert [h["outcome"] for h in history] == ["Replaced", "Serving"]
    assert history[-1]["revision"] == world.status["revision"] != history[0]["revision"]
    assert history[-1]["digest"] == NEW_DIGEST
    assert world.plan(at(200)).writes == 0


def test_a_retried_loader_that_verified_everything_is_verified():
    world = placed(World(model_body(), default_fleet()), ready=False)
    pod = revision_pod(world.deployment(), f"{NAME}-pod-1")
    pod["status"]["initContainerStatuses"] = [
        {
            "name": "load-weights",
            "state": {"terminated": {"exitCode": 0}},
            "lastState": {"terminated": {"exitCode": 13, "message": "reset"}},
        }
    ]
    world.pods = [pod]
    plan = world.reconcile(at(10))
    assert weights_condition(world.status)[:2] == ("True", "Verified")
    assert "StorageUnreachable" not in reasons(plan)


def test_the_previous_revision_keeps_serving_through_a_readiness_blip():
    world = placed(World(model_body(serving={"replicas": 2}), default_fleet()))
    old_revision = world.status["revision"]
    world.deployment()["status"]["readyReplicas"] = 1  # one of two pods restarting
    world.edit_spec(new_digest)
    plan = world.reconcile(at(100))
    assert plan.delete == ()
    assert plan.status["servingRevision"] == old_revision
    assert summary(plan.status)["Ready"] == ("True", "ServingPreviousRevision")


def test_read_config_is_not_changed_by_a_models_declared_facts():
    read = {"model_type": "gemma3", "text_config": {"hidden_size": 2560, "num_hidden_layers": 34}}
    facts = WeightsFacts(digest=DIGEST, config=read)
    declared = model_body()
    declared["spec"]["architecture"] = {
        **declared["spec"].get("architecture", {}),
        "modelType": "gemma3",
        "numHiddenLayers": 99,
    }
    hf_config(SmallModel.model_validate(declared), facts)
    assert facts.config["text_config"]["num_hidden_layers"] == 34


def test_declared_facts_do_not_override_the_read_dtype_with_a_default():
    read = {
        "model_type": "qwen2",
        "num_hidden_layers": 24,
        "hidden_size": 896,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "torch_dtype": "float32",
    }
    body = model_body()
    body["spec"]["architecture"] = {
        "modelType": "qwen2",
        "numHiddenLayers": 24,
        "hiddenSize": 896,
        "numAttentionHeads": 14,
        "numKeyValueHeads": 2,
        "vocabSize": 151936,
        "intermediateSize": 4864,
        "maxPositionEmbeddings": 32768,
    }
    merged = hf_config(SmallModel.model_validate(body), WeightsFacts(digest=DIGEST, config=read))
    assert merged["torch_dtype"] == "float32"


def test_the_weights_volume_holds_what_the_loader_writes():
    world = World(model_body(), default_fleet())
    world.weights = WeightsFacts(digest=DIGEST, weights_bytes=1 * 2**30, disk_bytes=5 * 2**30)
    world.reconcile(T0)
    volumes = {v["name"]: v for v in world.deployment()["spec"]["template"]["spec"]["volumes"]}
    assert volumes["weights"]["emptyDir"]["sizeLimit"] == "6Gi"  # 5 GiB plus headroom, not the 1 GiB served


# --- image pulls -----------------------------------------------------------------------------------------------


def test_a_pod_that_cannot_pull_its_image_degrades_the_model_naming_the_image():
    world = World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1)])
    world.settle(T0)
    pod = revision_pod(world.deployment(), f"{NAME}-pod-1", node="l4-a")
    vllm = pod["spec"]["containers"][0]
    pod["status"]["containerStatuses"] = [
        {
            "name": vllm["name"],
            "image": vllm["image"],
            "ready": False,
            "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "registry said: secret-looking text"}},
        }
    ]
    world.pods = [pod]
    world.reconcile(at(30))
    degraded = world.condition("Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ImagePullFailed")
    assert vllm["image"] in degraded["message"] and "cannot pull" in degraded["message"]
    assert "secret-looking" not in degraded["message"]  # the registry's text stays in the pod's status

    # The kubelet alternates ErrImagePull and ImagePullBackOff while it backs off: one state, no
    # status rewrite per attempt.
    for reason in ("ErrImagePull", "ImagePullBackOff", "ErrImagePull"):
        pod["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": reason}}
        world.pods = [pod]
        assert world.plan(at(31)).writes == 0

    # Once the image is pulled and the pod runs, the condition clears.
    pod["status"]["containerStatuses"][0]["state"] = {"running": {"startedAt": rfc3339(at(40))}}
    world.pods = [pod]
    world.reconcile(at(45))
    assert world.condition("Degraded")["status"] == "False"


def test_a_new_loader_image_does_not_restart_a_serving_revision_but_new_revisions_get_it():
    world = placed(World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1)]))
    before = copy.deepcopy(world.deployment())
    [loader] = before["spec"]["template"]["spec"]["initContainers"]
    # The operator is upgraded: its config names a new loader image (the operator's own image).
    new_loader = "registry.example/slmfleet/slmfleet:0.2.0@sha256:" + "9" * 64
    world.config = world.config.model_copy(update={"loader_image": new_loader})
    assert world.plan(at(60)).writes == 0
    # A new revision (new weights) is built with the new loader.
    world.body["spec"]["source"]["digest"] = "sha256:" + "7" * 64
    world.body["metadata"]["generation"] += 1
    world.settle(at(90))
    new_dep = world.deployment(spec_revision(world.body))
    assert new_dep["spec"]["template"]["spec"]["initContainers"][0]["image"] == new_loader
    assert loader["image"] != new_loader


# --- pod hardening across operator upgrades --------------------------------------------------------------------


def built_before_the_hardening(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator as its releases before the pod hardening were: they built what the builders
    build with `hardened=False` (byte for byte the same template)."""
    build = desired.build_deployment
    monkeypatch.setattr(desired, "build_deployment", lambda *args, **kwargs: build(*args, **{**kwargs, "hardened": False}))


def read_only_roots(dep: dict[str, Any]) -> dict[str, bool]:
    pod = dep["spec"]["template"]["spec"]
    return {c["name"]: c["securityContext"].get("readOnlyRootFilesystem", False)
            for c in (*pod["initContainers"], *pod["containers"])}


def target_of(world: World) -> Target:
    """What the next reconcile builds the serving revision's Deployment with."""
    body = world.body
    return Target(ModelOwner.from_metadata(body["metadata"]), SmallModelSpec.model_validate(body["spec"]),
                  world.status["revision"], world.config, None, world.deployment())


def test_an_upgrade_to_hardened_pods_restarts_no_serving_revision_and_new_revisions_are_hardened(monkeypatch):
    with monkeypatch.context() as previous_release:
        built_before_the_hardening(previous_release)
        world = placed(World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1), gpu_node("l4-b", L4, L4_MIB, 1)]))
    live = copy.deepcopy(world.deployment())
    assert read_only_roots(live) == {"load-weights": False, "vllm": False}
    # The upgraded operator builds the live Deployment as it is: same template, same applied
    # hash, so it applies nothing and the Deployment controller rolls no pod.
    placement = Placement.model_validate(world.status["placement"])
    again = target_of(world).deployment(placement)
    assert again["spec"]["template"] == live["spec"]["template"]
    assert again["metadata"]["annotations"][APPLIED_HASH] == live["metadata"]["annotations"][APPLIED_HASH]
    assert world.plan(at(60)).writes == 0
    # Scaling the revision applies its Deployment again, with the pod template it has: new
    # replicas come up as the others did, and the running one is not replaced.
    world.edit_spec(lambda spec: spec.setdefault("serving", {}).update({"replicas": 2}))
    assert ("Deployment", live["metadata"]["name"]) in applied(world.reconcile(at(70)))
    scaled = world.deployment()
    assert scaled["spec"]["replicas"] == 2
    assert scaled["spec"]["template"] == live["spec"]["template"]
    world.mark_ready()
    world.settle(at(80))
    # A new revision (new weights) runs hardened pods.
    world.edit_spec(lambda spec: spec["source"].update({"digest": NEW_DIGEST}))
    world.settle(at(90))
    new = world.deployment(spec_revision(world.body))
    assert new["metadata"]["name"] != live["metadata"]["name"]
    assert read_only_roots(new) == {"load-weights": True, "vllm": True}
    assert "limits" in new["spec"]["template"]["spec"]["initContainers"][0]["resources"]
    assert "tmp" in {v["name"] for v in new["spec"]["template"]["spec"]["volumes"]}


def test_hardened_pods_stay_hardened():
    world = placed(World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1), gpu_node("l4-b", L4, L4_MIB, 1)]))
    live = copy.deepcopy(world.deployment())
    assert read_only_roots(live) == {"load-weights": True, "vllm": True}
    assert LivePodShape.of(live) == LivePodShape(loader_image=LOADER_IMAGE, hardened=True)
    assert world.plan(at(60)).writes == 0
    world.edit_spec(lambda spec: spec.setdefault("serving", {}).update({"replicas": 2}))
    world.settle(at(70))
    assert world.deployment()["spec"]["template"] == live["spec"]["template"]


def test_a_revisions_first_deployment_is_hardened_whatever_else_is_live():
    assert LivePodShape.of(None) == LivePodShape(loader_image=None, hardened=True)
    # Without a vLLM container that says so, a live Deployment is taken as built before the hardening.
    assert LivePodShape.of({"spec": {"template": {"spec": {"containers": []}}}}).hardened is False


# --- extraArgs: the tenant allow-list of vLLM flags ------------------------------------------------------------


def test_a_refused_vllm_flag_degrades_the_model_and_makes_no_deployment():
    body = model_body(serving={"extraArgs": ["--enable-prefix-caching", "--load-format", "dummy", "--max-model=99"]})
    world = World(body, default_fleet())
    plan = world.reconcile(T0)
    assert ("Deployment", f"{NAME}-{spec_revision(body)}") not in applied(plan)
    assert not any(kind == "Deployment" for kind, _ in world.kinds_and_names())
    degraded = world.condition("Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ExtraArgsRefused")
    assert "--load-format (never allowed for tenants)" in degraded["message"]
    assert "--max-model (abbreviates --max-model-len, which is set by the operator)" in degraded["message"]
    assert "dummy" not in degraded["message"] and "99" not in degraded["message"]  # names, never values
    assert "--enable-prefix-caching" not in degraded["message"]
    assert summary(world.status)["Ready"] == ("False", "ExtraArgsRefused")
    assert "ExtraArgsRefused" in reasons(plan)
    assert world.plan(at(60)).writes == 0  # said once


def test_a_serving_model_keeps_its_revision_when_an_edit_adds_a_refused_flag():
    world = placed(World(model_body(), [gpu_node("l4-a", L4, L4_MIB, 1)]))
    serving = world.status["servingRevision"]
    world.edit_spec(lambda spec: spec.setdefault("serving", {}).update(
        {"extraArgs": ["--otlp-traces-endpoint=http://collector.elsewhere:4317"]}))
    world.settle(at(60))
    assert {name for kind, name in world.kinds_and_names() if kind == "Deployment"} == {f"{NAME}-{serving}"}
    assert summary(world.status)["Ready"] == ("True", "ServingPreviousRevision")
    degraded = world.condition("Degraded")
    assert degraded["reason"] == "ExtraArgsRefused" and "--otlp-traces-endpoint" in degraded["message"]
    assert "collector.elsewhere" not in degraded["message"]
    # Dropping the flag serves the spec again.
    world.edit_spec(lambda spec: spec["serving"].update({"extraArgs": ["--enable-prefix-caching"]}))
    world.settle(at(120))
    assert world.condition("Degraded")["reason"] != "ExtraArgsRefused"
    assert "--enable-prefix-caching" in world.deployment()["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_platform_extends_the_flags_tenants_may_pass():
    body = model_body(serving={"extraArgs": ["--enable-lora", "--max-loras", "2", "--enable-prefix"]})
    refused = World(body, default_fleet())
    refused.reconcile(T0)
    assert refused.condition("Degraded")["reason"] == "ExtraArgsRefused"
    assert "--enable-lora (not on the allow-list)" in refused.condition("Degraded")["message"]

    extended = CONFIG.model_copy(update={"tenant_vllm_flags": ["--enable-lora", "--max-loras"]})
    world = World(body, default_fleet(), extended)
    world.settle(T0)
    args = world.deployment()["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[1:5] == ["--enable-lora", "--max-loras", "2", "--enable-prefix"]
    assert world.condition("Degraded")["reason"] != "ExtraArgsRefused"


def test_a_name_taken_by_another_owner_applies_nothing_even_to_a_served_model():
    world = placed(World(model_body(), fleet("l4")))
    plan = plan_model(dataclasses.replace(world.observe(), conflict="Service qwen-chat"), world.config, T0)
    assert not plan.apply and not plan.delete
    degraded = condition(plan.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "Conflict")
    assert "Service qwen-chat" in degraded["message"]


def test_a_passed_verification_is_no_event_and_a_failed_one_is_a_warning():
    from slmfleet.api.conditions import Condition
    from slmfleet.planning.status import changed_condition_events

    def cond(type_: str, status: str, reason: str, message: str) -> Condition:
        return Condition(type=type_, status=status, reason=reason, message=message, observed_generation=1)
    old = [cond("Ready", "False", "Waiting", "0/1"), cond("WeightsVerified", "Unknown", "Loading", "")]
    both = [cond("Ready", "True", "Serving", "1/1 replicas ready"),
            cond("WeightsVerified", "True", "Verified", "pod p verified every file")]
    assert [(e.type, e.reason, e.message) for e in changed_condition_events(old, both)] == [
        ("Normal", "Ready", "1/1 replicas ready")]
    assert changed_condition_events(old, both, served=False) == []  # a new model's first readiness
    assert changed_condition_events(old, [old[0], both[1]]) == []
    failed = cond("WeightsVerified", "False", "FileMismatch", "pod p: model.safetensors changed")
    assert [(e.type, e.reason) for e in changed_condition_events(old, [old[0], failed])] == [("Warning", "FileMismatch")]


# --- replicas and room ---------------------------------------------------------------------------------


def _taken_but(nodes: list[dict[str, Any]], resource: str, spare: str) -> list[dict[str, Any]]:
    """Other tenants' pods on every `resource` device, but one on node `spare` (the model's own)."""
    return [gpu_pod(n["metadata"]["name"],
                    int(n["status"]["allocatable"][resource]) - (n["metadata"]["name"] == spare),
                    uid=f"other-{n['metadata']['name']}", resource=resource)
            for n in nodes if resource in n["status"]["allocatable"]]


def serving_on_its_only_free_device(pools: tuple[str, ...]) -> World:
    """A one-replica model Ready, its pod bound, and every other device of its class taken."""
    world = placed(World(model_body(), fleet(*pools)))
    placement = world.status["placement"]
    resource = placement["gpuResource"]
    node = next(n["metadata"]["name"] for n in world.nodes if resource in n["status"]["allocatable"])
    world.pods = [revision_pod(world.deployment(), f"{NAME}-pod-1", node=node)]
    world.other_pods = _taken_but(world.nodes, resource, node)
    assert world.plan(at(30)).writes == 0  # its own device is its own: nothing to move for
    return world


def test_a_scale_up_without_room_where_the_model_is_moves_it_where_every_replica_fits():
    world = serving_on_its_only_free_device(("a100-40gb-mig", "l4"))
    assert f"{world.status['placement']['gpuResource']}|{world.status['placement']['gpuProduct']}|1" == MIG_2G
    world.edit_spec(lambda spec: spec.setdefault("serving", {}).update(replicas=2))
    plan = world.reconcile(at(60))
    moved = plan.status["placement"]
    assert f"{moved['gpuResource']}|{moved['gpuProduct']}|{moved['gpuCount']}" == MIG_3G
    assert world.deployment()["spec"]["replicas"] == 2
    template = world.deployment()["spec"]["template"]
    assert template["metadata"]["annotations"][PLACEMENT_ANNOTATION] == MIG_3G
    [event] = [e for e in plan.events if e.reason == "Placed"]
    assert event.type == "Normal" and "serving.replicas is 2" in event.message and "room for 1" in event.message
    # Once there, it stays: the new class holds both replicas.
    world.mark_ready()
    world.settle(at(70))
    assert world.plan(at(80)).writes == 0


def test_a_scale_up_that_no_class_has_room_for_keeps_the_model_where_it_serves():
    world = serving_on_its_only_free_device(("l4",))
    before = world.status["placement"]
    world.edit_spec(lambda spec: spec.setdefault("serving", {}).update(replicas=2))
    plan = world.reconcile(at(60))
    assert plan.status["placement"] == before
    assert world.deployment()["spec"]["replicas"] == 2
    assert "Placed" not in reasons(plan)


def test_a_new_model_with_two_replicas_is_placed_where_both_fit():
    nodes = fleet("a100-40gb-mig", "l4")
    one_slice_left = _taken_but(nodes, "nvidia.com/mig-2g.10gb", nodes[0]["metadata"]["name"])
    single = World(model_body(), nodes)
    single.other_pods = one_slice_left
    assert single.reconcile(T0).status["placement"]["gpuResource"] == "nvidia.com/mig-2g.10gb"
    double = World(model_body(serving={"replicas": 2}), nodes)
    double.other_pods = one_slice_left
    placement = double.reconcile(T0).status["placement"]
    assert f"{placement['gpuResource']}|{placement['gpuProduct']}|{placement['gpuCount']}" == MIG_3G
    assert any("hold all 2 replicas" in r for r in placement["reasons"])


def test_a_pending_pod_waits_out_its_timeout_though_its_class_has_no_room_left():
    # The timeout is the platform team's say (a node may be on its way): no early move for room.
    world, placement = pending_world()
    world.other_pods = _taken_but(world.nodes, "nvidia.com/mig-2g.10gb", "")
    since = at(100)
    world.pods = [revision_pod(world.deployment(), f"{NAME}-pod-1", unschedulable_since=since)]
    plan = world.plan(since + dt.timedelta(seconds=5))
    assert plan.writes == 0 and world.status["placement"] == placement
    assert plan.requeue_after == pytest.approx(6, abs=0.01)


def test_a_placement_waiting_for_its_pod_stays_when_a_later_reservation_overfills_its_class():
    # Its Deployment is applied and reserves the only L4; another model, planned later, reserves an
    # L4 too (its own scale-up, say). The later one is short of room, not this one.
    nodes = [gpu_node("l4-a", L4, L4_MIB, 1), h100_node("h100", 1)]
    world = World(model_body(), nodes)
    world.settle(T0)
    placed_on = world.status["placement"]["gpuProduct"]
    assert placed_on == L4
    live = LiveInventory()
    for node in nodes:
        live.set_node(node["metadata"]["name"], node)
    live.set_reservations((NAMESPACE, NAME), {world.status["revision"]: {("nvidia.com/gpu", L4): 1}})
    live.set_reservations(("models", "later"), {"rev": {("nvidia.com/gpu", L4): 1}})
    plan = plan_model(dataclasses.replace(world.observe(), cluster=live), world.config, at(30))
    assert plan.writes == 0
    # The later model, placed anew, sees the L4 promised: the H100 is what it gets.
    assert [e.free for e in live.inventory(reserved_for=(("models", "later"), "rev")).nodes
            if e.device.product == L4] == [0]
