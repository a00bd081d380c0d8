"""Check live SmallModels and ModelRollouts against the Argo CD health scripts, and capture them as
the scripts' test data.

An end-to-end test that has brought an object to a known phase calls

    from e2e.argocd_capture import capture
    capture("SmallModel", live_body, "serving")

which always asserts that Argo CD's verdict on the live object (the script run by the harness in
e2e/argocd_health, as Argo CD runs it) is the one that phase calls for, and, when the environment
has SLMFLEET_CAPTURE_ARGOCD=1, also writes the object (without managedFields, uid, resourceVersion,
creationTimestamp and other per-run noise) to
`charts/slmfleet/argocd/slmfleet.io/<Kind>/testdata/<phase>.yaml` and records the verdict in the
kind's health_test.yaml, so `git diff` shows what changed since the last capture.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from e2e.argocd_health import CHECKS, health

ENV = "SLMFLEET_CAPTURE_ARGOCD"

# The Argo CD health each captured phase must get.
EXPECTED: dict[str, dict[str, str]] = {
    "SmallModel": {
        "no-status": "Progressing",  # created, the operator has not written a status yet
        "pending": "Progressing",  # placed, replicas not ready yet
        "nofit": "Degraded",  # no placement fits
        "serving": "Healthy",
        "stale-generation": "Progressing",  # spec edited, the operator has not reconciled it yet
        "deprecated-base": "Degraded",  # spec.baseModel deprecated (serving the last known good)
        "reconcile-error": "Degraded",  # reconciling keeps failing for the current generation
        "scaled-to-zero": "Healthy",  # serving.replicas: 0
        "rolling-out": "Progressing",  # a new revision replaces the serving one (no ModelRollout)
        "canary": "Healthy",  # a ModelRollout governs the new revision; the stable serves
    },
    "ModelRollout": {
        "no-status": "Progressing",
        "pending": "Progressing",  # the candidate is not ready yet
        "evaluating": "Progressing",
        "paused": "Suspended",  # at a pause step
        "promoted": "Healthy",
        "rolledback": "Degraded",  # an evaluation or live metrics failed the candidate
        "failed": "Degraded",  # the candidate cannot serve (its weights fail their pin) mid-rollout
        "refused": "Degraded",  # the candidate's base model is deprecated: never deployed
        "idle": "Healthy",  # nothing to roll out
        "stale-generation": "Progressing",
        "not-governing": "Degraded",  # its SmallModel does not exist, or another rollout governs it
    },
}

# Per-run metadata that would make every capture differ from the last.
NOISE_METADATA = ("managedFields", "uid", "resourceVersion", "creationTimestamp", "selfLink", "generateName")
NOISE_ANNOTATION_PREFIXES = ("kopf.zalando.org/", "kubectl.kubernetes.io/last-applied-configuration")

HEADER = (
    "# Argo CD's resource_customizations test layout: each object under testdata/ and the health\n"
    "# the script must give it. Run by tests/test_argocd_health.py (e2e/argocd_health harness);\n"
    "# e2e/argocd_capture.py rewrites an entry when SLMFLEET_CAPTURE_ARGOCD=1.\n"
)


# e2e namespaces end in a random suffix; captured objects are moved to this one.
CAPTURED_NAMESPACE = "slmfleet-e2e"


def _renamed(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_renamed(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _renamed(v, old, new) for k, v in value.items()}
    return value


def strip(obj: dict[str, Any], *, namespace_as: str | None = None) -> dict[str, Any]:
    """The object without per-run noise, as test data; with `namespace_as`, its namespace renamed
    to that wherever it appears (metadata, endpoints, messages)."""
    out = copy.deepcopy(obj)
    namespace = (out.get("metadata") or {}).get("namespace")
    if namespace_as and namespace and namespace != namespace_as:
        out = _renamed(out, namespace, namespace_as)
    meta = out.get("metadata") or {}
    for key in NOISE_METADATA:
        meta.pop(key, None)
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if not k.startswith(NOISE_ANNOTATION_PREFIXES)}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    return out


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, width=100000, allow_unicode=True)


def read_health_tests(kind: str) -> list[dict[str, Any]]:
    path = CHECKS / kind / "health_test.yaml"
    if not path.exists():
        return []
    return list((yaml.safe_load(path.read_text()) or {}).get("tests") or [])


def write_health_tests(kind: str, tests: list[dict[str, Any]]) -> Path:
    path = CHECKS / kind / "health_test.yaml"
    path.write_text(HEADER + _dump({"tests": tests}))
    return path


def record(kind: str, obj: dict[str, Any], phase: str) -> tuple[Path, tuple[str, str]]:
    """Write `obj` (stripped) as testdata/<phase>.yaml and its current verdict into health_test.yaml."""
    body = strip(obj, namespace_as=CAPTURED_NAMESPACE)
    data = CHECKS / kind / "testdata" / f"{phase}.yaml"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(_dump(body))
    status, message = health(body, kind)
    input_path = f"testdata/{phase}.yaml"
    entry = {"healthStatus": {"status": status, "message": message}, "inputPath": input_path}
    tests = read_health_tests(kind)
    for i, test in enumerate(tests):
        if test.get("inputPath") == input_path:
            tests[i] = entry
            break
    else:
        tests.append(entry)
    write_health_tests(kind, tests)
    return data, (status, message)


def capture(kind: str, obj: dict[str, Any], phase: str) -> tuple[str, str]:
    """Assert Argo CD's verdict on the live `obj` is the one `phase` calls for; with
    SLMFLEET_CAPTURE_ARGOCD=1 also record it as test data. Returns (status, message)."""
    expected = EXPECTED.get(kind, {}).get(phase)
    if expected is None:
        raise ValueError(f"unknown phase {phase!r} of {kind} (known: {', '.join(EXPECTED.get(kind, {}))})")
    status, message = health(obj, kind)
    name = (obj.get("metadata") or {}).get("name")
    assert status == expected, f"Argo CD would show {kind} {name} ({phase}) as {status}: {message!r}; expected {expected}"
    if os.environ.get(ENV) == "1":
        record(kind, obj, phase)
    return status, message
