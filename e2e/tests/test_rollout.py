"""ModelRollout acceptance, end to end: real stand-in pods on the two process nodes, weights in a
real S3 server (MinIO), the operator evaluating stable and candidate through their pod IPs.

Each test serves a stable revision, then changes the SmallModel's digest to a candidate whose
`standin.json` answers the evaluation cases equally, worse, or slower, and watches the rollout
decide; a background thread checks that the stable's ready replicas never drop meanwhile."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from e2e.argocd_capture import capture
from e2e.tests.conftest import delete_models
from e2e.tests.test_weights import (
    GROUP,
    QWEN_CONFIG,
    TENSORS,
    VERSION,
    condition,
    credentials_secret,
    s3_model,
    safetensors_file,
    upload,
)
from e2e.wait import wait_for

PLURAL = "smallmodels"
MR_PLURAL = "modelrollouts"
CASES = [{"prompt": f"What is {i} + {i}?", "expected": str(2 * i)} for i in range(60)]


def files(answers: dict[str, str], seed: int, latency_ms: tuple[int, int] = (5, 10),
          startup_seconds: float = 0, error_rate: float = 0.0) -> dict[str, bytes]:
    standin = {"responses": [{"prompt": p, "completion": c} for p, c in answers.items()],
               "default_completion": "I don't know.", "latency_ms": {"mean": latency_ms[0], "p95": latency_ms[1]},
               "error_rate": error_rate, "startup_seconds": startup_seconds}
    return {"config.json": json.dumps(QWEN_CONFIG).encode(), "standin.json": json.dumps(standin).encode(),
            "model.safetensors": safetensors_file(TENSORS, seed=seed)}


RIGHT = {c["prompt"]: c["expected"] for c in CASES}
HALF_WRONG = {c["prompt"]: (c["expected"] if i % 2 else "5") for i, c in enumerate(CASES)}


def rollout(name: str, model: str, steps: list[dict], scale_down: int = 0, **thresholds) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRollout", "metadata": {"name": name},
        "spec": {
            "modelRef": {"name": model},
            "steps": steps,
            "evaluation": {"dataset": {"inline": CASES}, "scorers": [{"type": "exactMatch"}],
                           "sampleSize": 60, "concurrency": 4, "thresholds": {"margin": 0.1, **thresholds}},
            "scaleDownDelaySeconds": scale_down,
        },
    }


def get(crs, namespace: str, plural: str, name: str) -> dict:
    return crs.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)


FINAL = ("Promoted", "RolledBack", "Failed")
NO_DEPRECATIONS = "deprecated base models: none"


def wait_phase(crs, namespace: str, name: str, *also: str, timeout: float = 180) -> dict:
    """The rollout once its phase is final, or one of `also`."""
    phases = (*also, *FINAL)

    def check():
        obj = get(crs, namespace, MR_PLURAL, name)
        return obj if (obj.get("status") or {}).get("phase") in phases else None
    return wait_for(check, timeout, 0.3, f"rollout {name} in {phases}")


class StableWatch:
    """Polls, in the background, the ready replicas of `revision`'s Deployment while the SmallModel
    says that revision serves; `lowest` is the minimum seen (samples after it stopped serving, when
    it may go, are not counted)."""

    def __init__(self, apps, crs, namespace: str, model: str, revision: str) -> None:
        self.apps, self.crs, self.namespace, self.model, self.revision = apps, crs, namespace, model, revision
        self.lowest: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                dep = self.apps.read_namespaced_deployment(f"{self.model}-{self.revision}", self.namespace)
                ready = dep.status.ready_replicas or 0
            except Exception:  # noqa: BLE001 - gone counts as zero
                ready = 0
            serving = (get(self.crs, self.namespace, PLURAL, self.model).get("status") or {}).get("servingRevision")
            if serving == self.revision:
                self.lowest = ready if self.lowest is None else min(self.lowest, ready)
                self.samples += 1
            self._stop.wait(0.1)

    def __enter__(self) -> StableWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def cleanup(crs, core, namespace, process_nodes_free):
    yield
    delete_models(crs.api_client, namespace)
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, 120, what="pods gone")


def stable_under_rollout(s3, crs, core, namespace: str, name: str, steps: list[dict], *,
                         traffic: dict | None = None, **rollout_args) -> tuple[str, str]:
    """A model serving its first revision (S3 weights answering every case, base org/base-v1),
    governed by a rollout of `steps`; (that revision, its digest)."""
    uri, digest = upload(s3, files(RIGHT, seed=1))
    credentials_secret(core, namespace, s3)
    body = s3_model(name, uri, digest, s3.endpoint_url)
    body["spec"]["baseModel"] = "org/base-v1"
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def serving():
        obj = get(crs, namespace, PLURAL, name)
        return obj if condition(obj, "Ready").get("status") == "True" and obj["status"].get("history") else None
    model = wait_for(serving, 180, 0.5, f"{name} serving")
    policy = rollout(name, name, steps, **rollout_args)
    if traffic:
        policy["spec"]["traffic"] = traffic
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, MR_PLURAL, policy)
    return model["status"]["servingRevision"], digest


def change_weights(crs, s3, namespace: str, name: str, answers: dict[str, str], seed: int, base: str,
                   latency_ms: tuple[int, int] = (5, 10), startup_seconds: float = 0, error_rate: float = 0.0) -> str:
    uri, digest = upload(s3, files(answers, seed=seed, latency_ms=latency_ms, startup_seconds=startup_seconds,
                                   error_rate=error_rate))
    crs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {
        "spec": {"source": {"uri": uri, "digest": digest}, "baseModel": base}})
    return digest


def events_of(core, namespace: str, name: str) -> list[tuple[str, str]]:
    items = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [(e.reason, e.message or "") for e in items]


def test_an_equal_candidate_is_promoted_and_a_deprecated_base_rolls_back_to_the_last_known_good_digest(
        operator, s3, crs, core, apps, namespace, cleanup, cluster):
    stable, first_digest = stable_under_rollout(
        s3, crs, core, namespace, "eq",
        [{"evaluate": {}}, {"setWeight": 50}, {"pause": {"duration": "2s"}}, {"setWeight": 100}],
        scale_down=3)
    with StableWatch(apps, crs, namespace, "eq", stable) as watch:
        digest = change_weights(crs, s3, namespace, "eq", RIGHT, seed=2, base="org/base-v2")
        done = wait_phase(crs, namespace, "eq")
        assert done["status"]["phase"] == "Promoted", done["status"]
        capture("ModelRollout", done, "promoted")  # Argo CD: Healthy
    assert watch.samples > 10 and watch.lowest == 1, "the stable's ready replicas never dropped"
    result = done["status"]["evaluations"][0]
    assert result["verdict"] == "Pass" and result["candidateScore"] == result["stableScore"] == "1.0000"
    assert "non-inferiority" in result["method"]
    model = wait_for(lambda: (m := get(crs, namespace, PLURAL, "eq"))["status"]["servingRevision"] != stable and m,
                     60, what="candidate serving")
    candidate = model["status"]["servingRevision"]
    assert [h["outcome"] for h in model["status"]["history"]][-2:] == ["Replaced", "Promoted"]
    assert model["status"]["history"][-1]["digest"] == digest
    wanted = {"EvaluationStarted", "EvaluationPassed", "CanaryWeight", "StepStarted", "Promoted"}
    # Events are posted right after the status write that the waits above saw.
    wait_for(lambda: wanted <= {r for r, _ in events_of(core, namespace, "eq")}, 15, 0.2, f"events {wanted}")
    wait_for(lambda: not [p for p in core.list_namespaced_pod(namespace, label_selector=f"slmfleet.io/revision={stable}").items],
             90, what="old stable retired")

    # The platform team deprecates the candidate's base: the model goes back to the first digest.
    core.create_namespace({"metadata": {"name": "slmfleet-system"}}) if not any(
        n.metadata.name == "slmfleet-system" for n in core.list_namespace().items) else None
    cm = {"metadata": {"name": "slmfleet-deprecations"}, "data": {
        "deprecations.yaml": "deprecations:\n- baseModel: org/base-v2\n  reason: licence withdrawn\n"}}
    core.create_namespaced_config_map("slmfleet-system", cm)
    try:
        with StableWatch(apps, crs, namespace, "eq", candidate) as watch:
            def rolled_back():
                m = get(crs, namespace, PLURAL, "eq")
                degraded = condition(m, "Degraded")
                serving = m["status"]["servingRevision"]
                return m if degraded.get("reason") == "BaseModelDeprecated" and serving == stable else None
            model = wait_for(rolled_back, 180, 0.5, "rollback to the last known good revision")
            capture("SmallModel", model, "deprecated-base")  # Argo CD: Degraded
            assert watch.lowest == 1, "the deprecated revision served until the fallback was ready"
        assert first_digest in condition(model, "Degraded")["message"]
        dep = apps.read_namespaced_deployment(f"eq-{stable}", namespace)
        assert first_digest in json.dumps(dep.to_dict(), default=str)
        wait_for(lambda: "BaseModelDeprecated" in [r for r, _ in events_of(core, namespace, "eq")], 15, 0.2,
                 "BaseModelDeprecated event")
    finally:
        # Back to no deprecations before the next test: an empty list (deleting the ConfigMap
        # would keep the last list: it fails safe). Wait until the operator has read it (it logs
        # every change of the list), not for a guessed poll interval; then the ConfigMap can go.
        emptied = operator.log_text().count(NO_DEPRECATIONS)
        core.patch_namespaced_config_map("slmfleet-deprecations", "slmfleet-system",
                                         {"data": {"deprecations.yaml": "deprecations: []\n"}})
        wait_for(lambda: operator.log_text().count(NO_DEPRECATIONS) > emptied, 30, 0.2,
                 "the operator to read the emptied deprecations list")
        core.delete_namespaced_config_map("slmfleet-deprecations", "slmfleet-system")


def test_a_worse_candidate_is_rolled_back_and_the_stable_keeps_its_replicas(
        operator, s3, crs, core, apps, namespace, cleanup):
    stable, _ = stable_under_rollout(s3, crs, core, namespace, "worse",
                                     [{"evaluate": {}}, {"setWeight": 50}, {"evaluate": {}}, {"setWeight": 100}])
    before = operator.metrics()
    with StableWatch(apps, crs, namespace, "worse", stable) as watch:
        change_weights(crs, s3, namespace, "worse", HALF_WRONG, seed=3, base="org/base-v1")
        done = wait_phase(crs, namespace, "worse")
        decided = time.monotonic()
        assert done["status"]["phase"] == "RolledBack", done["status"]
        capture("ModelRollout", done, "rolledback")  # Argo CD: Degraded
        candidate = done["status"]["candidateRevision"]
        wait_for(lambda: (apps.read_namespaced_deployment(f"worse-{candidate}", namespace).spec.replicas == 0),
                 10, 0.1, "candidate scaled to 0")
        assert time.monotonic() - decided < 5
    assert watch.lowest == 1
    result = done["status"]["evaluations"][0]
    assert result["verdict"] == "Fail" and float(result["candidateScore"]) < float(result["stableScore"])
    assert done["status"]["canaryWeight"] == 0
    # The rollout's status is written before the model's: the model follows on its own reconcile.
    wait_for(lambda: condition(get(crs, namespace, PLURAL, "worse"), "Degraded").get("reason") == "RolloutFailed",
             15, 0.2, "model Degraded/RolloutFailed")
    model = get(crs, namespace, PLURAL, "worse")
    degraded = condition(model, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RolloutFailed")
    assert model["status"]["servingRevision"] == stable
    assert model["status"]["history"][-1]["outcome"] == "RolledBack"
    svc = core.read_namespaced_service("worse", namespace)
    assert svc.spec.selector["slmfleet.io/revision"] == stable
    wait_for(lambda: {"EvaluationFailed", "RolledBack", "RolloutFailed"} <= {r for r, _ in events_of(core, namespace, "worse")},
             15, 0.2, "rollback events")
    after = operator.metrics()
    key = f'slmfleet_rollbacks_total{{namespace="{namespace}",reason="EvaluationFailed",rollout="worse"}}'
    assert after.get(key, 0) == before.get(key, 0) + 1, [k for k in after if "rollback" in k]
    verdicts = f'slmfleet_evaluation_verdicts_total{{namespace="{namespace}",rollout="worse",verdict="fail"}}'
    assert after.get(verdicts, 0) >= 1
    assert any(k.startswith("slmfleet_evaluation_score{") and 'rollout="worse"' in k for k in after)


def test_a_candidate_slower_than_the_p95_threshold_is_rolled_back(operator, s3, crs, core, apps, namespace, cleanup):
    stable, _ = stable_under_rollout(s3, crs, core, namespace, "slow", [{"evaluate": {}}, {"setWeight": 100}],
                                     maxP95LatencySeconds=0.25)
    with StableWatch(apps, crs, namespace, "slow", stable) as watch:
        change_weights(crs, s3, namespace, "slow", RIGHT, seed=4, base="org/base-v1", latency_ms=(400, 600))
        done = wait_phase(crs, namespace, "slow", timeout=240)
    assert watch.lowest == 1
    assert done["status"]["phase"] == "RolledBack", done["status"]
    assert "p95 latency" in done["status"]["message"]
    result = done["status"]["evaluations"][0]
    assert float(result["candidateP95LatencySeconds"]) > 0.25 > float(result["stableP95LatencySeconds"])
    assert get(crs, namespace, PLURAL, "slow")["status"]["servingRevision"] == stable


@pytest.mark.parametrize("phase", ["Pending", "Evaluating", "Paused"])
def test_an_operator_killed_mid_rollout_resumes_without_repeating_a_step(
        phase, operator, s3, crs, core, apps, namespace, cleanup):
    """Killed with the candidate created but not ready, mid-evaluation, after a weight change."""
    stable, _ = stable_under_rollout(
        s3, crs, core, namespace, "restart",
        [{"evaluate": {}}, {"setWeight": 50}, {"pause": {"duration": "8s"}}, {"setWeight": 100}],
        scale_down=3)
    with StableWatch(apps, crs, namespace, "restart", stable) as watch:
        # A slow start and slow answers make the first two phases long enough to catch.
        change_weights(crs, s3, namespace, "restart", RIGHT, seed=5, base="org/base-v1",
                       latency_ms=(150, 250) if phase == "Evaluating" else (5, 10),
                       startup_seconds=6 if phase == "Pending" else 0)
        caught = wait_phase(crs, namespace, "restart", phase)
        assert caught["status"]["phase"] == phase, caught["status"]
        capture("ModelRollout", caught, phase.lower())  # Argo CD: Progressing, or Suspended when Paused
        if phase == "Paused":
            capture("SmallModel", get(crs, namespace, PLURAL, "restart"), "canary")  # the stable serves: Healthy
        operator.kill()  # SIGKILL: no chance to finish anything
        operator.start()
        done = wait_phase(crs, namespace, "restart")
    assert done["status"]["phase"] == "Promoted", done["status"]
    assert watch.lowest == 1
    assert [e["step"] for e in done["status"]["evaluations"]] == [0], "one verdict per evaluate step"
    wait_for(lambda: "Promoted" in [r for r, _ in events_of(core, namespace, "restart")], 15, 0.2, "Promoted event")
    weights = [m for r, m in events_of(core, namespace, "restart") if r == "CanaryWeight"]
    # Events are posted after the status write, so the kill may take one with it; what must
    # never happen is a step applied (and announced) a second time.
    assert len([m for m in weights if "-> 50%" in m]) <= 1, weights
    assert len([m for m in weights if "-> 100%" in m]) == 1, weights
    assert not [m for m in weights if "re-applying" in m], weights


def chat_at(ip: str, prompt: str) -> None:
    body = json.dumps({"model": "qwen-pinned", "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 8}).encode()
    req = urllib.request.Request(f"http://{ip}:8000/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
    except urllib.error.HTTPError:
        pass  # a failing candidate is what some tests want


def send_live_traffic(core, namespace: str, revision: str, requests: int = 40) -> None:
    """Traffic straight to the revision's pod (no gateway or kube-proxy runs here), 8 at a time."""
    pod = next(p for p in core.list_namespaced_pod(namespace, label_selector=f"slmfleet.io/revision={revision}").items)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: chat_at(pod.status.pod_ip, CASES[i % len(CASES)]["prompt"]), range(requests)))


def test_http_route_weights_and_a_live_latency_regression_roll_back(
        operator, s3, crs, core, apps, namespace, cleanup, cluster):
    stable, _ = stable_under_rollout(
        s3, crs, core, namespace, "live", [{"setWeight": 30}, {"pause": {"duration": "5m"}}, {"setWeight": 100}],
        traffic={"httpRoute": {"parentRefs": [{"name": "inference-gateway"}]}}, maxP95LatencySeconds=0.5)

    def route_weights() -> dict[str, int]:
        out = cluster._kubectl("get", "httproute", "live", "-n", namespace, "-o", "json", check=False)
        if out.returncode:
            return {}
        return {b["name"]: b["weight"] for b in json.loads(out.stdout)["spec"]["rules"][0]["backendRefs"]}

    wait_for(lambda: route_weights() == {f"live-{stable}": 100}, 30, 0.3, "the route on the stable")
    with StableWatch(apps, crs, namespace, "live", stable) as watch:
        change_weights(crs, s3, namespace, "live", RIGHT, seed=6, base="org/base-v1", latency_ms=(900, 1400))
        paused = wait_phase(crs, namespace, "live", "Paused")
        assert paused["status"]["phase"] == "Paused", paused["status"]
        candidate = paused["status"]["candidateRevision"]
        assert route_weights() == {f"live-{stable}": 70, f"live-{candidate}": 30}
        # Live traffic reaches the candidate (no gateway runs here: straight to its pod), and it is slow.
        send_live_traffic(core, namespace, candidate)
        done = wait_phase(crs, namespace, "live", timeout=60)
    assert done["status"]["phase"] == "RolledBack", done["status"]
    assert "live metrics regressed" in done["status"]["message"] and "p95 latency" in done["status"]["message"]
    assert watch.lowest == 1
    wait_for(lambda: route_weights() == {f"live-{stable}": 100, f"live-{candidate}": 0}, 15, 0.2, "weight back to 0")


def test_replica_ratio_weights_and_a_live_error_rate_regression_roll_back(
        operator, s3, crs, core, apps, namespace, cleanup):
    stable, _ = stable_under_rollout(s3, crs, core, namespace, "errs",
                                     [{"setWeight": 30}, {"pause": {"duration": "5m"}}, {"setWeight": 100}],
                                     maxErrorRate=0.05)
    with StableWatch(apps, crs, namespace, "errs", stable) as watch:
        change_weights(crs, s3, namespace, "errs", RIGHT, seed=7, base="org/base-v1", error_rate=0.5)
        paused = wait_phase(crs, namespace, "errs", "Paused")
        assert paused["status"]["phase"] == "Paused", paused["status"]
        candidate = paused["status"]["candidateRevision"]
        # Replica ratio: the model Service spreads over both revisions' pods (one each here).
        svc = core.read_namespaced_service("errs", namespace)
        assert svc.spec.selector == {"slmfleet.io/model": "errs"}
        assert svc.metadata.annotations["slmfleet.io/canary"] == f"{candidate}=30"
        send_live_traffic(core, namespace, candidate)
        done = wait_phase(crs, namespace, "errs", timeout=60)
    assert done["status"]["phase"] == "RolledBack", done["status"]
    assert "live metrics regressed" in done["status"]["message"] and "error rate" in done["status"]["message"]
    assert watch.lowest == 1
    wait_for(lambda: core.read_namespaced_service("errs", namespace).spec.selector.get("slmfleet.io/revision") == stable,
             15, 0.2, "the Service back on the stable")


def test_a_rollout_started_during_the_grace_period_waits_for_capacity_and_completes(
        operator, s3, crs, core, apps, namespace, cleanup):
    """The two process nodes have one L4 each: the stable and one canary. Promote, change the model
    again while the replaced revision still holds its GPU: the new candidate fits nowhere until the
    grace period retires the replaced revision, says so on the rollout, then completes on its own."""
    first, _ = stable_under_rollout(s3, crs, core, namespace, "again", [{"setWeight": 100}], scale_down=20)
    change_weights(crs, s3, namespace, "again", RIGHT, seed=7, base="org/base-v1")
    promoted = wait_phase(crs, namespace, "again")
    assert promoted["status"]["phase"] == "Promoted", promoted["status"]
    second = promoted["status"]["candidateRevision"]
    assert apps.read_namespaced_deployment(f"again-{first}", namespace), "the replaced revision is in its grace period"

    change_weights(crs, s3, namespace, "again", RIGHT, seed=8, base="org/base-v1")

    def unschedulable():
        status = get(crs, namespace, MR_PLURAL, "again").get("status") or {}
        progressing = condition({"status": status}, "Progressing")
        return status if progressing.get("reason") == "CandidateUnschedulable" else None
    waiting = wait_for(unschedulable, 60, 0.3, "the rollout to say the candidate cannot be placed")
    assert waiting["candidateRevision"] not in (first, second)
    assert "NVIDIA-L4" in condition({"status": waiting}, "Progressing")["message"]

    done = wait_phase(crs, namespace, "again", timeout=180)
    assert done["status"]["phase"] == "Promoted", done["status"]
    assert done["status"]["candidateRevision"] == waiting["candidateRevision"]
    names = {d.metadata.name for d in apps.list_namespaced_deployment(namespace).items}
    assert f"again-{first}" not in names
    reasons = [r for r, _ in events_of(core, namespace, "again")]
    assert "CandidateUnschedulable" in reasons and "RevisionRetired" in reasons
