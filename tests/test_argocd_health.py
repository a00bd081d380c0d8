"""The Argo CD health checks in charts/slmfleet/argocd/, run as Argo CD runs them.

The scripts run in the Go harness of e2e/argocd_health (gopher-lua with only the libraries Argo CD
opens for argocd-cm health scripts). Checked here: both health_test.yaml suites; the verdict on the
statuses the operator's own plan code writes, phase by phase (the simulated worlds of
test_model_plan and test_rollout_plan); that each health.lua is generated from lib/common.lua and its
kind's rules.lua, and argocd-cm-patch.yaml from the health.lua files;
and that the harness really lacks the string library (a script that needs it fails there).
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from typing import Any

import pytest
import yaml

from e2e.argocd_capture import EXPECTED, strip
from e2e.argocd_health import (
    CHECKS,
    KINDS,
    HealthScriptError,
    cm_patch,
    health,
    run_health_tests,
    run_script,
    script_path,
    scripts,
)
from slmfleet.api.conditions import Condition, set_condition
from slmfleet.api.smallmodel import SmallModelStatus
from slmfleet.planning.rollout import plan_not_governing
from slmfleet.rollout.deprecations import parse_deprecations
from slmfleet.weights.facts import WeightsFacts
from tests.test_model_plan import NEW_DIGEST, T0, World, at, default_fleet, fleet, model_body, no_fit_body, placed
from tests.test_rollout_plan import (
    new_candidate,
    past_the_first_evaluation,
    rollout_body,
    stable_world,
)

# --- Argo CD's own test layout ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_health_test_suites_pass_under_argo_cds_libraries(kind):
    results = run_health_tests(CHECKS / kind)
    assert results, f"{kind}: no tests ran"
    failed = [str(r) for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    # every object under testdata/ is in the suite, and every phase capture knows is covered
    listed = {r.input_path for r in results}
    on_disk = {f"testdata/{p.name}" for p in (CHECKS / kind / "testdata").glob("*.yaml")}
    assert listed == on_disk
    assert {f"testdata/{phase}.yaml" for phase in EXPECTED[kind]} == on_disk
    for r in results:
        phase = r.input_path.removeprefix("testdata/").removesuffix(".yaml")
        assert r.expected[0] == EXPECTED[kind][phase], r


def test_a_wrong_expectation_fails_the_suite(tmp_path):
    kind_dir = tmp_path / "SmallModel"
    kind_dir.mkdir()
    (kind_dir / "health.lua").write_text(script_path("SmallModel").read_text())
    (kind_dir / "testdata").mkdir()
    (kind_dir / "testdata" / "serving.yaml").write_text((CHECKS / "SmallModel" / "testdata" / "serving.yaml").read_text())
    (kind_dir / "health_test.yaml").write_text(yaml.safe_dump({"tests": [
        {"healthStatus": {"status": "Degraded", "message": "not what the script says"}, "inputPath": "testdata/serving.yaml"},
    ]}))
    [result] = run_health_tests(kind_dir)
    assert not result.ok and result.actual[0] == "Healthy"


# --- the interpreter is Argo CD's, not a stock Lua ---------------------------------------------------


def test_the_harness_runs_without_the_string_library():
    uses_string = 'local at = string.find(obj.kind, "Model")\nreturn {status = "Healthy", message = "found at " .. at}\n'
    obj = {"kind": "SmallModel"}
    with pytest.raises(HealthScriptError, match="find"):
        run_script(uses_string, obj)
    # the same script passes when the kind has useOpenLibs, so it is the library set that failed it
    assert run_script(uses_string, obj, open_libs=True) == ("Healthy", "found at 6")
    # string methods need the string library too
    with pytest.raises(HealthScriptError):
        run_script('return {status = "Healthy", message = obj.kind:sub(1, 5)}\n', obj)
    # math and a global os are absent; base and table are there
    probe = ('return {status = "Healthy", message = type(math) .. " " .. type(os) .. " " .. type(table.concat) .. " "'
             ' .. type(ipairs) .. " " .. type(require("os").time)}\n')
    assert run_script(probe, {}) == ("Healthy", "nil nil function function function")


def test_the_scripts_use_only_what_argo_cd_opens():
    for kind in KINDS:
        source = script_path(kind).read_text()
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("--"))
        assert not re.search(r"\b(string|math|os|io|debug|coroutine|utf8)\s*\.", code), kind
        assert not re.search(r":\s*(find|sub|match|gsub|gmatch|format|len|lower|upper|rep|byte)\s*\(", code), kind
        assert "Libraries:" in source, f"{kind}: the script says which libraries it relies on"


def test_a_script_error_and_an_invalid_status_are_reported_as_argo_cd_does():
    with pytest.raises(HealthScriptError, match="deadline"):
        run_script("while true do end\n", {})
    assert run_script('return {status = "Fine"}\n', {}) == ("Unknown", "Lua returned an invalid health status")


# --- argocd-cm patch ------------------------------------------------------------------------------------


def test_the_argocd_cm_patch_is_generated_from_the_scripts():
    path = CHECKS.parent / "argocd-cm-patch.yaml"
    assert path.read_text() == cm_patch.render(), "regenerate: python -m e2e.argocd_health.cm_patch"
    patch = yaml.safe_load(path.read_text())
    assert (patch["apiVersion"], patch["kind"], patch["metadata"]["name"]) == ("v1", "ConfigMap", "argocd-cm")
    assert patch["data"] == {
        f"resource.customizations.health.slmfleet.io_{kind}": script_path(kind).read_text() for kind in KINDS
    }


def test_a_changed_script_shows_as_drift(tmp_path, monkeypatch):
    changed = tmp_path / "slmfleet.io"
    for kind in KINDS:
        (changed / kind).mkdir(parents=True)
        (changed / kind / "health.lua").write_text(script_path(kind).read_text() + "-- edited\n")
    monkeypatch.setattr(cm_patch, "CHECKS", changed)
    assert cm_patch.render() != (CHECKS.parent / "argocd-cm-patch.yaml").read_text()


# --- health.lua generated from lib/common.lua and <Kind>/rules.lua --------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_health_script_is_generated_from_common_and_its_rules(kind):
    common, rules = scripts.source_paths(kind)
    assert script_path(kind).read_text() == scripts.render(kind), "regenerate: python -m e2e.argocd_health.cm_patch"
    generated = script_path(kind).read_text()
    assert generated.startswith(scripts.header(kind)) and "GENERATED" in scripts.header(kind)
    # the header, then common.lua, then the kind's rules, each whole and in that order
    at_common = generated.index(common.read_text())
    assert generated.index(rules.read_text(), at_common) > at_common


def test_the_shared_helpers_are_written_once_in_common_lua():
    declared = re.compile(r"^local\s+(?:function\s+)?(\w+)", re.M)
    shared = set(declared.findall(scripts.source_paths(KINDS[0])[0].read_text()))
    assert {"find", "text", "describe", "health", "current", "status", "generation", "ready"} <= shared
    for kind in KINDS:
        rules = scripts.source_paths(kind)[1].read_text()
        assert "local function" not in rules, f"{kind}: helpers belong in lib/common.lua"
        assert not shared & set(declared.findall(rules)), f"{kind}: redeclares common.lua's locals"


def test_an_edited_source_or_health_script_shows_as_drift(tmp_path, monkeypatch, capsys):
    import shutil

    argocd = tmp_path / "argocd"
    shutil.copytree(CHECKS.parent, argocd)
    monkeypatch.setattr(cm_patch, "CHECKS", argocd / "slmfleet.io")
    assert cm_patch.main(["--check"]) == 0

    # a hand edit of a generated health.lua
    edited = argocd / "slmfleet.io" / "SmallModel" / "health.lua"
    edited.write_text(edited.read_text() + "-- edited\n")
    assert cm_patch.main(["--check"]) == 1
    assert "SmallModel/health.lua is out of date" in capsys.readouterr().err
    assert cm_patch.main([]) == 0 and cm_patch.main(["--check"]) == 0
    assert "-- edited" not in edited.read_text()

    # an edit of common.lua reaches both scripts and the patch
    common = argocd / "lib" / "common.lua"
    common.write_text(common.read_text().replace("waiting for the operator\")", "waiting for slmfleet\")"))
    assert cm_patch.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert all(f"{kind}/health.lua is out of date" in err for kind in KINDS) and "argocd-cm-patch.yaml" in err
    assert cm_patch.main([]) == 0 and cm_patch.main(["--check"]) == 0
    for kind in KINDS:
        script = argocd / "slmfleet.io" / kind / "health.lua"
        assert run_script(script, {"kind": kind}) == ("Progressing", "waiting for slmfleet")
    patch = yaml.safe_load((argocd / "argocd-cm-patch.yaml").read_text())
    assert all("waiting for slmfleet" in v for v in patch["data"].values())


def test_a_source_the_patch_could_not_hold_byte_for_byte_is_refused(tmp_path):
    import shutil

    argocd = tmp_path / "argocd"
    shutil.copytree(CHECKS.parent, argocd)
    rules = argocd / "slmfleet.io" / "ModelRollout" / "rules.lua"
    rules.write_text(rules.read_text().replace("paused = true\n", "paused = true  \n"))
    with pytest.raises(ValueError, match="trailing blanks"):
        scripts.render("ModelRollout", argocd / "slmfleet.io")


# --- the statuses the operator writes, phase by phase -------------------------------------------------


def _with_status(body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(body), "status": copy.deepcopy(status)}


def smallmodel_phases() -> dict[str, dict[str, Any]]:
    """A SmallModel in each phase capture knows, its status written by the operator's plan code."""
    out: dict[str, dict[str, Any]] = {"no-status": model_body()}

    world = World(model_body(), fleet("l4"))
    world.settle(T0)
    out["pending"] = copy.deepcopy(world.body)

    world = World(no_fit_body(), default_fleet())
    world.reconcile(T0)
    out["nofit"] = copy.deepcopy(world.body)

    world = placed(World(model_body(), fleet("l4")))
    out["serving"] = copy.deepcopy(world.body)

    world.edit_spec(lambda spec: spec.setdefault("serving", {}).update(replicas=2))
    out["stale-generation"] = copy.deepcopy(world.body)

    # what handlers.operator._report_failure writes when reconciling this generation keeps failing
    old = SmallModelStatus.model_validate(world.body["status"])
    failing = Condition(type="Degraded", status="True", reason="ReconcileError",
                        message="reconciling keeps failing (ApiError: 503 Service Unavailable); the operator retries "
                                "with back-off", observed_generation=world.body["metadata"]["generation"])
    out["reconcile-error"] = _with_status(world.body, old.model_copy(
        update={"conditions": set_condition(old.conditions, failing, "2025-06-02T09:05:00Z")}).to_wire())

    world = placed(World(model_body(), fleet("l4")))
    world.edit_spec(lambda spec: spec.setdefault("serving", {}).update(replicas=0))
    world.reconcile(at(60))
    out["scaled-to-zero"] = copy.deepcopy(world.body)

    world = placed(World(model_body(), fleet("l4")))
    world.edit_spec(lambda spec: spec["source"].update(digest="sha256:" + "cd" * 32))
    world.settle(at(60))
    out["rolling-out"] = copy.deepcopy(world.body)

    world, _ = stable_world()
    new_candidate(world)
    world.settle(at(1))
    out["canary"] = copy.deepcopy(world.body)

    world, _ = stable_world(base="org/base-v1")
    candidate = past_the_first_evaluation(world, base="org/base-v2")
    world.finish("Pass")
    world.settle(at(4))
    world.mark_ready(candidate)
    world.settle(at(100))
    world.deprecations = parse_deprecations("deprecations:\n- baseModel: org/base-v2\n  reason: licence withdrawn\n")
    world.settle(at(101))
    world.mark_ready(world.status["revision"])
    world.settle(at(102))
    out["deprecated-base"] = copy.deepcopy(world.body)
    return out


def modelrollout_phases() -> dict[str, dict[str, Any]]:
    """A ModelRollout in each phase capture knows, its status written by the operator's plan code."""
    out: dict[str, dict[str, Any]] = {"no-status": rollout_body()}

    world, _ = stable_world()
    out["idle"] = copy.deepcopy(world.rollout)
    new_candidate(world)
    world.settle(at(1))
    out["pending"] = copy.deepcopy(world.rollout)
    world.candidate_ready()
    world.settle(at(2))
    out["evaluating"] = copy.deepcopy(world.rollout)
    stale = copy.deepcopy(world.rollout)
    stale["spec"]["evaluation"]["sampleSize"] = 200
    stale["metadata"]["generation"] += 1
    out["stale-generation"] = stale

    world, _ = stable_world()
    past_the_first_evaluation(world)
    world.finish("Fail")
    world.reconcile(at(4))
    out["rolledback"] = copy.deepcopy(world.rollout)

    world, _ = stable_world()
    candidate = past_the_first_evaluation(world)
    world.finish("Pass")
    world.settle(at(4))
    world.mark_ready(candidate)
    world.settle(at(70))
    out["promoted"] = copy.deepcopy(world.rollout)

    world, _ = stable_world(rollout_body(steps=[{"setWeight": 50}, {"pause": {"duration": "1h"}}, {"setWeight": 100}]))
    new_candidate(world)
    world.settle(at(1))
    world.candidate_ready()
    world.reconcile(at(2))
    out["paused"] = copy.deepcopy(world.rollout)

    world, _ = stable_world(rollout_body(steps=[{"setWeight": 50}, {"pause": {"duration": "1h"}}]))
    new_candidate(world)
    world.settle(at(1))
    world.candidate_ready()
    world.settle(at(2))
    world.weights = WeightsFacts(digest=NEW_DIGEST, problem="DigestMismatch",
                                 message="the manifest's digest is sha256:0f1e... but spec.source.digest pins "
                                         + NEW_DIGEST)
    world.reconcile(at(4))
    out["failed"] = copy.deepcopy(world.rollout)

    world, _ = stable_world(base="org/base-v1")
    world.deprecations = parse_deprecations("deprecations:\n- baseModel: org/base-v2\n  reason: unsafe\n")
    new_candidate(world, base="org/base-v2")
    world.settle(at(1))
    out["refused"] = copy.deepcopy(world.rollout)

    orphan = rollout_body()
    orphan["spec"]["modelRef"]["name"] = "gone"
    status = plan_not_governing(orphan, "ModelNotFound", "SmallModel models/gone does not exist",
                                T0 + dt.timedelta(seconds=5))
    out["not-governing"] = _with_status(orphan, status)
    return out


PHASES = {"SmallModel": smallmodel_phases, "ModelRollout": modelrollout_phases}


@pytest.mark.parametrize("kind", KINDS)
def test_each_phase_the_operator_writes_gets_the_health_it_calls_for(kind):
    objects = PHASES[kind]()
    assert set(objects) == set(EXPECTED[kind])
    wrong = {}
    for phase, obj in objects.items():
        verdict = health(strip(obj), kind)
        if verdict[0] != EXPECTED[kind][phase]:
            wrong[phase] = verdict
    assert not wrong, wrong


# --- e2e capture ----------------------------------------------------------------------------------------


def test_capture_asserts_the_verdict_and_records_live_objects_only_when_asked(tmp_path, monkeypatch):
    import shutil

    from e2e import argocd_capture

    checks = tmp_path / "slmfleet.io"
    shutil.copytree(CHECKS, checks)
    monkeypatch.setattr(argocd_capture, "CHECKS", checks)
    live = smallmodel_phases()["serving"]
    live = yaml.safe_load(yaml.safe_dump(live).replace(live["metadata"]["namespace"], "t-serving-1a2b3"))
    live["metadata"].update(uid="5f0c", resourceVersion="4711", creationTimestamp="2025-06-02T08:00:00Z",
                            managedFields=[{"manager": "kopf"}],
                            annotations={"kopf.zalando.org/last-handled-configuration": "{}", "team": "a"})
    written = checks / "SmallModel" / "testdata" / "serving.yaml"
    before = written.read_text()

    monkeypatch.delenv(argocd_capture.ENV, raising=False)
    assert argocd_capture.capture("SmallModel", live, "serving")[0] == "Healthy"
    assert written.read_text() == before, "nothing written unless asked"
    with pytest.raises(AssertionError, match="Healthy"):
        argocd_capture.capture("SmallModel", live, "nofit")
    with pytest.raises(ValueError):
        argocd_capture.capture("SmallModel", live, "sideways")

    monkeypatch.setenv(argocd_capture.ENV, "1")
    argocd_capture.capture("SmallModel", live, "serving")
    saved = yaml.safe_load(written.read_text())
    assert not {"uid", "resourceVersion", "creationTimestamp", "managedFields"} & set(saved["metadata"])
    assert saved["metadata"]["annotations"] == {"team": "a"}
    assert saved["metadata"]["namespace"] == argocd_capture.CAPTURED_NAMESPACE
    assert "t-serving-1a2b3" not in written.read_text()
    renamed = yaml.safe_dump(live["status"]).replace("t-serving-1a2b3", argocd_capture.CAPTURED_NAMESPACE)
    assert saved["status"] == yaml.safe_load(renamed)
    results = run_health_tests(checks / "SmallModel")
    assert len(results) == len(EXPECTED["SmallModel"]) and all(r.ok for r in results), [str(r) for r in results]
