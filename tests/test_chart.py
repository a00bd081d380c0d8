"""The Helm chart charts/slmfleet, rendered and linted by the real helm (built by
e2e/build-binaries.sh helm when missing), and checked against the code it deploys: the operator
config parses with the real OperatorConfig, the CRDs are crds/, the RBAC is deploy/rbac.yaml's,
the pods pass Pod Security `restricted`, and every image comes from one registry, by digest."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

import slmfleet
from slmfleet.api.config import MAX_IMAGE_PULL_SECRETS, NAMESPACE_PATTERN, SECRET_NAME_PATTERN, parse_operator_config
from slmfleet.builders.labels import revision_labels
from slmfleet.builders.pod import PORT_NAME
from slmfleet.cli.chart import main as chart_main
from slmfleet.cli.chart import stale_files
from slmfleet.cli.main import build_parser
from slmfleet.rollout.deprecations import DATA_KEY, parse_deprecations
from tests.test_builders import restricted_violations

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "slmfleet"
NAMESPACE = "slmfleet-system"
KUBE_VERSION = "1.34.0"
OPERATOR_DIGEST = "sha256:" + "1f" * 32
VLLM_DIGEST = "sha256:" + "2e" * 32
DIGESTS = {"image": {"digest": OPERATOR_DIGEST}, "vllm": {"image": {"digest": VLLM_DIGEST}}}
PINNED = re.compile(r"@sha256:[0-9a-f]{64}$")
SCHEMA_MESSAGE = "does not match pattern '^sha256:[0-9a-f]{64}$'"

# Building helm the first time takes minutes (the fixture does it once per session).
pytestmark = pytest.mark.timeout(1800)


def _load_package_module():
    spec = importlib.util.spec_from_file_location("chart_package", REPO / "charts" / "package.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["chart_package"] = module
    spec.loader.exec_module(module)
    return module


package = _load_package_module()


@pytest.fixture(scope="session")
def helm() -> Path:
    path = package.default_helm()
    if not path.is_file():
        subprocess.run([str(REPO / "e2e" / "build-binaries.sh"), "helm"], check=True)
    assert path.is_file(), f"e2e/build-binaries.sh helm did not build {path}"
    return path


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def template(helm: Path, tmp_path: Path, values: dict | None = None, *, chart: Path = CHART,
             files: tuple[Path, ...] = (), digests: bool = True, release: str = "slmfleet",
             namespace: str = NAMESPACE) -> subprocess.CompletedProcess:
    merged = deep_merge(DIGESTS if digests else {}, values or {})
    values_file = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
    values_file.write_text(yaml.safe_dump(merged))
    file_args = [arg for f in files for arg in ("-f", str(f))]
    return run_helm(helm, "template", release, str(chart), "-n", namespace, "--kube-version", KUBE_VERSION,
                    *file_args, "-f", str(values_file))


def render(helm: Path, tmp_path: Path, values: dict | None = None, **kwargs) -> list[dict]:
    result = template(helm, tmp_path, values, **kwargs)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def operator_config(docs: list[dict]):
    return parse_operator_config(one(docs, "ConfigMap", "slmfleet-config")["data"]["operator-config.yaml"])


def images_in(node) -> list[str]:
    """Every `image:` value in a rendered object."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "image" and isinstance(v, str)]
        return found + [i for v in node.values() for i in images_in(v)]
    if isinstance(node, list):
        return [i for v in node for i in images_in(v)]
    return []


def normalized_rules(rules: list[dict]) -> list[tuple]:
    """Rules as a sorted list of (group, resource, verb) grants, so layout does not matter."""
    return sorted({(g, r, v, tuple(rule.get("resourceNames", ()))) for rule in rules for g in rule["apiGroups"]
                   for r in rule["resources"] for v in rule["verbs"]})


# ------------------------------------------------------------------ lint, version, values in git

def test_helm_lint(helm, tmp_path):
    values = tmp_path / "digests.yaml"
    values.write_text(yaml.safe_dump(DIGESTS))
    for extra in ([], ["-f", str(CHART / "ci" / "airgap-values.yaml")],
                  ["--set", "rbac.scope=namespaced", "--set", "watchNamespaces={team-a,team-b}"]):
        result = run_helm(helm, "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION,
                          "-n", NAMESPACE, *extra, "-f", str(values))
        assert result.returncode == 0, result.stdout + result.stderr


def test_chart_version_is_the_projects():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == chart["appVersion"] == project == slmfleet.__version__
    assert chart["kubeVersion"] == ">=1.29.0-0"
    assert chart["appVersion"] == yaml.safe_load((CHART / "values.yaml").read_text())["image"]["tag"]


def test_too_old_kubernetes_is_refused(helm, tmp_path):
    values = tmp_path / "digests.yaml"
    values.write_text(yaml.safe_dump(DIGESTS))
    result = run_helm(helm, "template", "slmfleet", str(CHART), "--kube-version", "1.28.9", "-f", str(values))
    assert result.returncode != 0 and "kubeVersion" in result.stderr


def test_no_digest_is_typed_into_the_chart():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["digest"] == "" and values["vllm"]["image"]["digest"] == ""
    for path in CHART.rglob("*"):
        # argocd/ holds health-script test objects, whose weight digests are no image's.
        if path.is_file() and "argocd" not in path.relative_to(CHART).parts:
            assert not re.search(r"sha256:[0-9a-f]{64}", path.read_text()), f"{path} holds a digest"


def test_values_without_a_digest_fail_with_the_schemas_message(helm, tmp_path):
    result = template(helm, tmp_path, digests=False)
    assert result.returncode != 0
    assert f"at '/image/digest': '' {SCHEMA_MESSAGE}" in result.stderr
    assert f"at '/vllm/image/digest': '' {SCHEMA_MESSAGE}" in result.stderr
    for bad in ("sha256:abc", "latest", "sha256:" + "A" * 64, "sha512:" + "a" * 128):
        result = template(helm, tmp_path, {"vllm": {"image": {"digest": bad}}})
        assert result.returncode != 0 and "at '/vllm/image/digest'" in result.stderr, bad
    schema = json.loads((CHART / "values.schema.json").read_text())
    digest = schema["properties"]["image"]["properties"]["digest"]
    assert digest["pattern"] == "^sha256:[0-9a-f]{64}$" and "Required" in digest["description"]


def test_schema_refuses_what_the_operator_would_refuse(helm, tmp_path):
    for values, where in (
        ({"config": {"startupTimeout": 60}}, "/config"),            # misspelt: unknown key
        ({"config": {"vllmPort": 80}}, "/config/vllmPort"),
        ({"config": {"imagePullPolicy": "Sometimes"}}, "/config/imagePullPolicy"),
        ({"imagePullSecrets": ["Not_A_Secret"]}, "/imagePullSecrets/0"),
        ({"replicaCount": 11}, "/replicaCount"),
        ({"config": {"leaderElection": {"leaseDuration": 15}}}, "/config/leaderElection"),  # misspelt
        ({"rbac": {"scope": "namespaced"}}, "/watchNamespaces"),   # namespaced needs namespaces
        ({"imageRegistry": "https://mirror/"}, "/imageRegistry"),
    ):
        result = template(helm, tmp_path, values)
        assert result.returncode != 0 and f"at '{where}" in result.stderr, (values, result.stderr)
    replicas = json.loads((CHART / "values.schema.json").read_text())["properties"]["replicaCount"]
    assert replicas["maximum"] > 1 and "leader election" in replicas["description"].lower()
    # More than one replica without leader election would be two operators acting on every model.
    result = template(helm, tmp_path, {"config": {"leaderElection": {"enabled": False}}})
    assert result.returncode != 0 and "needs config.leaderElection.enabled" in result.stderr, result.stderr
    assert template(helm, tmp_path, {"replicaCount": 1, "config": {"leaderElection": {"enabled": False}}}).returncode == 0


def test_hand_written_schema_bounds_agree_with_the_operator_config():
    properties = json.loads((CHART / "values.schema.json").read_text())["properties"]
    secrets = properties["imagePullSecrets"]
    assert secrets["maxItems"] == MAX_IMAGE_PULL_SECRETS
    assert secrets["items"]["pattern"] == SECRET_NAME_PATTERN
    assert properties["watchNamespaces"]["items"]["pattern"] == NAMESPACE_PATTERN


# ------------------------------------------------------------------ generated files

def test_generated_chart_files_have_not_drifted():
    assert stale_files(CHART) == [], "run `make chart-schema`"
    assert chart_main(["--chart", str(CHART), "--check"]) == 0
    for name in ("smallmodels.slmfleet.io.yaml", "modelrollouts.slmfleet.io.yaml"):
        assert (CHART / "files" / "crds" / name).read_text() == (REPO / "crds" / name).read_text()


def test_drift_check_catches_an_edited_schema_and_a_leftover_crd(tmp_path):
    chart = tmp_path / "slmfleet"
    shutil.copytree(CHART, chart)
    schema = json.loads((chart / "values.schema.json").read_text())
    schema["properties"]["config"]["properties"]["vllmPort"]["maximum"] = 70000
    (chart / "values.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    (chart / "files" / "crds" / "gone.slmfleet.io.yaml").write_text("kind: CustomResourceDefinition\n")
    assert chart_main(["--chart", str(chart), "--check"]) == 1
    assert chart_main(["--chart", str(chart)]) == 0
    assert stale_files(chart) == []
    assert (chart / "values.schema.json").read_text() == (CHART / "values.schema.json").read_text()


# ------------------------------------------------------------------ default render

def test_default_render(helm, tmp_path):
    docs = render(helm, tmp_path)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "ConfigMap", "ConfigMap", "CustomResourceDefinition",
                            "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Service",
                            "Deployment", "Pod", "Role", "RoleBinding", "PodDisruptionBudget"])
    for doc in docs:
        if doc["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]
    # The objects are named as deploy/ names them.
    assert one(docs, "Deployment")["metadata"]["name"] == "slmfleet-operator"
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "slmfleet-operator"
    assert one(docs, "ConfigMap", "slmfleet-deprecations")


def test_the_cpu_vllm_image_is_optional_and_pinned_when_set(helm, tmp_path):
    docs = render(helm, tmp_path)
    assert operator_config(docs).cpu_vllm_image is None
    cpu_digest = "sha256:" + "3c" * 32
    docs = render(helm, tmp_path, {"imageRegistry": "registry.internal:5000/mirror",
                                   "vllm": {"cpuImage": {"digest": cpu_digest}}})
    assert operator_config(docs).cpu_vllm_image == f"registry.internal:5000/mirror/vllm/vllm-cpu:v0.32.0@{cpu_digest}"
    bad = template(helm, tmp_path, {"vllm": {"cpuImage": {"digest": "latest"}}})
    assert bad.returncode != 0 and "cpuImage" in bad.stderr


def test_rendered_operator_config_parses_with_the_real_model(helm, tmp_path):
    docs = render(helm, tmp_path, {"config": {"vllmPort": 9000, "pendingTimeoutSeconds": 120},
                                   "imagePullSecrets": ["mirror-pull"]})
    config = operator_config(docs)
    assert config.vllm_image == f"vllm/vllm-openai:v0.32.0@{VLLM_DIGEST}"
    assert config.loader_image == f"slmfleet/slmfleet:0.1.0@{OPERATOR_DIGEST}"
    assert config.image_pull_secrets == ["mirror-pull"]
    assert (config.vllm_port, config.pending_timeout_seconds, config.startup_timeout_seconds) == (9000, 120, 1800)
    assert config.namespaces == []
    assert (config.deprecations.namespace, config.deprecations.name) == (NAMESPACE, "slmfleet-deprecations")
    # The loader is the operator's own image.
    [container] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == config.loader_image


def test_deprecations_value_becomes_the_configmap_the_operator_reads(helm, tmp_path):
    entries = [{"baseModel": "Qwen/Qwen2.5-7B-Instruct", "reason": "licence withdrawn", "after": "2026-12-01"},
               {"baseModel": "meta-llama/Llama-3.1-8B"}]
    docs = render(helm, tmp_path, {"deprecations": entries})
    parsed = parse_deprecations(one(docs, "ConfigMap", "slmfleet-deprecations")["data"][DATA_KEY])
    assert [(d.base_model, d.reason, str(d.after)) for d in parsed.entries] == [
        ("Qwen/Qwen2.5-7B-Instruct", "licence withdrawn", "2026-12-01"),
        ("meta-llama/Llama-3.1-8B", "deprecated", "None")]
    assert parse_deprecations(one(render(helm, tmp_path), "ConfigMap", "slmfleet-deprecations")["data"][DATA_KEY]).entries == ()


def test_the_operator_container_runs_the_real_cli(helm, tmp_path):
    docs = render(helm, tmp_path)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = build_parser().parse_args(container["args"])  # the image's entrypoint is `slmfleet`
    assert args.func.__name__ == "run_operator"
    # Probes and scrapes reach it on the pod IP, and it listens on nothing else.
    assert args.metrics_host == "$(POD_IP)"
    pod_ip = next(e for e in container["env"] if e["name"] == "POD_IP")
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    [port] = container["ports"]
    assert port == {"name": "http-metrics", "containerPort": args.metrics_port, "protocol": "TCP"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    # The config file is the ConfigMap's key, mounted read-only.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert str(args.config) == f"{mount['mountPath']}/operator-config.yaml" and mount["readOnly"]
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == "slmfleet-config"
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http-metrics"
    # Two replicas, one leading (Lease leader election); an update starts the new pod before the old one goes.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod_namespace = next(e for e in container["env"] if e["name"] == "POD_NAMESPACE")
    assert pod_namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert re.fullmatch(r"[0-9a-f]{64}", deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])


def test_operator_and_test_pods_pass_pod_security_restricted(helm, tmp_path):
    docs = render(helm, tmp_path)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    test_pod = one(docs, "Pod")["spec"]
    for spec in (pod, test_pod):
        assert restricted_violations(spec) == []
        assert spec["securityContext"]["runAsUser"] == 65532 and spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
    [container] = pod["containers"]
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])


def test_pod_placement_and_metadata_values(helm, tmp_path):
    values = {
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "platform"},
        "podLabels": {"team": "platform"},
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "resources": {"requests": {"cpu": "1"}},
        "serviceAccount": {"name": "custom-sa", "annotations": {"example.com/role": "x"}},
    }
    docs = render(helm, tmp_path, values)
    template_ = one(docs, "Deployment")["spec"]["template"]
    pod = template_["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "priorityClassName"):
        assert pod[key] == values[key]
    assert template_["metadata"]["annotations"]["example.com/team"] == "platform"
    assert template_["metadata"]["labels"]["team"] == "platform"
    assert template_["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    [container] = pod["containers"]
    assert {"name": "HTTPS_PROXY", "value": "http://proxy:3128"} in container["env"]
    assert container["resources"]["requests"]["cpu"] == "1"
    assert pod["serviceAccountName"] == "custom-sa"
    assert one(docs, "ServiceAccount")["metadata"] == {**one(docs, "ServiceAccount")["metadata"], "name": "custom-sa",
                                                       "annotations": {"example.com/role": "x"}}
    assert one(docs, "ClusterRoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "custom-sa", "namespace": NAMESPACE}]


# ------------------------------------------------------------------ images: one registry, by digest

def test_air_gapped_values_pull_every_image_from_the_mirror_by_digest(helm, tmp_path):
    registry = "127.0.0.1:5000/mirror"
    docs = render(helm, tmp_path, {"imageRegistry": registry, "imagePullSecrets": ["mirror-pull", "mirror-2"]})
    config = operator_config(docs)
    images = [i for d in docs for i in images_in(d)] + [config.vllm_image, config.loader_image]
    assert len(images) == 4  # operator, helm test pod, and the two the operator creates
    for image in images:
        assert image.startswith(registry + "/") and PINNED.search(image), image
    assert config.vllm_image == f"{registry}/vllm/vllm-openai:v0.32.0@{VLLM_DIGEST}"
    # The pull secrets: on the operator pod, the test pod, and passed on to every model pod.
    secrets = [{"name": "mirror-pull"}, {"name": "mirror-2"}]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["imagePullSecrets"] == secrets
    assert one(docs, "Pod")["spec"]["imagePullSecrets"] == secrets
    assert config.image_pull_secrets == ["mirror-pull", "mirror-2"]


def test_image_reference_forms(helm, tmp_path):
    def refs(values: dict) -> tuple[str, str]:
        config = operator_config(render(helm, tmp_path, values))
        return config.loader_image, config.vllm_image
    assert refs({"imageRegistry": "mirror.example.com"})[0] == f"mirror.example.com/slmfleet/slmfleet:0.1.0@{OPERATOR_DIGEST}"
    assert refs({"vllm": {"image": {"tag": ""}}})[1] == f"vllm/vllm-openai@{VLLM_DIGEST}"


def test_the_e2e_air_gap_values_file(helm, tmp_path):
    airgap = CHART / "ci" / "airgap-values.yaml"
    result = template(helm, tmp_path, files=(airgap,), digests=False)
    assert result.returncode != 0 and SCHEMA_MESSAGE in result.stderr  # digests come with --set
    docs = render(helm, tmp_path, files=(airgap,))
    config = operator_config(docs)
    images = [i for d in docs for i in images_in(d)] + [config.vllm_image, config.loader_image]
    assert all(i.startswith("127.0.0.1:16449/") and PINNED.search(i) for i in images), images
    assert config.vllm_image == f"127.0.0.1:16449/slmfleet/vllm-standin-test:0.1.0@{VLLM_DIGEST}"
    # The repositories the image build pushes (images/build.py), whether or not it has run here.
    from images.build import IMAGES

    values = yaml.safe_load(airgap.read_text())
    assert values["image"]["repository"] == IMAGES["slmfleet"]
    assert values["vllm"]["image"]["repository"] == IMAGES["vllm-standin"]


def _notes(helm: Path, tmp_path: Path, values: dict) -> str:
    """NOTES.txt rendered (helm template leaves it out): a copy of the chart renders it into a ConfigMap."""
    chart = tmp_path / "notes-chart" / "slmfleet"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "test.notes" -}}\n' + notes + "{{- end -}}\n")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: rendered-notes}\n"
        "data:\n  notes: {{ include \"test.notes\" . | quote }}\n")
    return one(render(helm, tmp_path, values, chart=chart), "ConfigMap", "rendered-notes")["data"]["notes"]


def test_notes_list_every_image_with_its_digest_ready_to_mirror(helm, tmp_path):
    notes = _notes(helm, tmp_path, {"imageRegistry": "registry.internal:5000/mirror"})
    operator = f"registry.internal:5000/mirror/slmfleet/slmfleet:0.1.0@{OPERATOR_DIGEST}"
    vllm = f"registry.internal:5000/mirror/vllm/vllm-openai:v0.32.0@{VLLM_DIGEST}"
    assert operator in notes and vllm in notes
    assert (f"crane copy docker.io/slmfleet/slmfleet:0.1.0@{OPERATOR_DIGEST} "
            "registry.internal:5000/mirror/slmfleet/slmfleet:0.1.0") in notes
    assert (f"crane copy docker.io/vllm/vllm-openai:v0.32.0@{VLLM_DIGEST} "
            "registry.internal:5000/mirror/vllm/vllm-openai:v0.32.0") in notes


# ------------------------------------------------------------------ CRDs

def rendered_crds(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}


def test_rendered_crds_are_crds_dir_plus_annotations(helm, tmp_path):
    on_disk = {yaml.safe_load(p.read_text())["metadata"]["name"]: yaml.safe_load(p.read_text())
               for p in (REPO / "crds").glob("*.yaml")}
    for values, expected_annotations in (
        ({}, {"helm.sh/resource-policy": "keep"}),
        ({"crds": {"keep": False}}, None),
        ({"crds": {"annotations": {"argocd.argoproj.io/sync-options": "ServerSideApply=true"}}},
         {"helm.sh/resource-policy": "keep", "argocd.argoproj.io/sync-options": "ServerSideApply=true"}),
    ):
        crds = rendered_crds(render(helm, tmp_path, values))
        assert set(crds) == set(on_disk) == {"smallmodels.slmfleet.io", "modelrollouts.slmfleet.io"}
        for name, crd in crds.items():
            assert crd["metadata"].pop("annotations", None) == expected_annotations
            assert crd == on_disk[name]
    assert rendered_crds(render(helm, tmp_path, {"crds": {"enabled": False}})) == {}


# ------------------------------------------------------------------ RBAC

LEASE_ROLE = "slmfleet-operator-leader-election"
LEASE_RULES = [("coordination.k8s.io", "leases", verb, ()) for verb in ("create", "get", "update")]


def test_leader_election_rbac_follows_the_lease_namespace_and_the_e2e_user_has_it(helm, tmp_path):
    for values, namespace in (({}, NAMESPACE), ({"config": {"leaderElection": {"leaseNamespace": "ops"}}}, "ops"),
                              ({"rbac": {"scope": "namespaced"}, "watchNamespaces": ["team-a"]}, NAMESPACE)):
        docs = render(helm, tmp_path, values)
        role = one(docs, "Role", LEASE_ROLE)
        assert role["metadata"]["namespace"] == namespace
        assert normalized_rules(role["rules"]) == sorted(LEASE_RULES)
        binding = one(docs, "RoleBinding", LEASE_ROLE)
        assert binding["metadata"]["namespace"] == namespace and binding["roleRef"]["name"] == LEASE_ROLE
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "slmfleet-operator", "namespace": NAMESPACE}]
    docs = render(helm, tmp_path, {"replicaCount": 1, "config": {"leaderElection": {"enabled": False}}})
    assert not [d for d in docs if d["metadata"].get("name") == LEASE_ROLE]
    # deploy/rbac.yaml (the local cluster's operator user) grants the same, in the e2e Lease's namespace.
    deployed = list(yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()))
    [role] = [d for d in deployed if d["kind"] == "Role"]
    e2e_config = parse_operator_config((REPO / "e2e" / "operator-config.yaml").read_text().replace(
        "namespaces: []", "namespaces: []\nvllmImage: v@sha256:" + "a" * 64 + "\nloaderImage: l@sha256:" + "b" * 64))
    assert role["metadata"]["namespace"] == e2e_config.leader_election.lease_namespace
    assert normalized_rules(role["rules"]) == sorted(LEASE_RULES)
    [binding] = [d for d in deployed if d["kind"] == "RoleBinding"]
    assert {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "slmfleet-operator"} in binding["subjects"]


def test_two_replicas_get_a_disruption_budget_and_prefer_different_nodes(helm, tmp_path):
    docs = render(helm, tmp_path)
    pdb = one(docs, "PodDisruptionBudget")
    deployment = one(docs, "Deployment")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    [term] = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"] == deployment["spec"]["selector"]
    single = render(helm, tmp_path, {"replicaCount": 1})
    assert not [d for d in single if d["kind"] == "PodDisruptionBudget"]

def test_cluster_scope_rbac_is_deploy_rbac(helm, tmp_path):
    docs = render(helm, tmp_path)
    [deploy_role] = [d for d in yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()) if d["kind"] == "ClusterRole"]
    role = one(docs, "ClusterRole")
    assert normalized_rules(role["rules"]) == normalized_rules(deploy_role["rules"])
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "slmfleet-operator", "namespace": NAMESPACE}]
    # Besides: only the leader-election Lease, in the release namespace.
    assert [(d["kind"], d["metadata"]["name"], d["metadata"]["namespace"]) for d in docs
            if d["kind"] in ("Role", "RoleBinding")] == [("Role", LEASE_ROLE, NAMESPACE), ("RoleBinding", LEASE_ROLE, NAMESPACE)]


def test_owner_references_with_block_owner_deletion_are_permitted():
    # Everything built for a model is owned by its SmallModel with blockOwnerDeletion.
    [deploy_role] = [d for d in yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()) if d["kind"] == "ClusterRole"]
    assert ("slmfleet.io", "smallmodels/finalizers", "update", ()) in normalized_rules(deploy_role["rules"])


def test_namespaced_rbac_with_two_watched_namespaces(helm, tmp_path):
    docs = render(helm, tmp_path, {"rbac": {"scope": "namespaced"}, "watchNamespaces": ["team-a", "team-b"]})
    [deploy_role] = [d for d in yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()) if d["kind"] == "ClusterRole"]
    cluster_role = one(docs, "ClusterRole")
    cluster_wide = normalized_rules(cluster_role["rules"])
    # Cluster-wide only what must be: nodes, pods (GPU inventory), CRDs and namespaces (kopf), read-only.
    assert {(g, r) for g, r, _, _ in cluster_wide} == {
        ("", "nodes"), ("", "pods"), ("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces")}
    assert {v for _, _, v, _ in cluster_wide} == {"get", "list", "watch"}
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] != LEASE_ROLE}
    assert set(roles) == {"team-a", "team-b", NAMESPACE}
    for namespace in ("team-a", "team-b"):
        # Per namespace plus cluster-wide is exactly deploy/rbac.yaml.
        assert sorted(normalized_rules(roles[namespace]["rules"]) + cluster_wide) == normalized_rules(deploy_role["rules"])
    # The release namespace: only the deprecations ConfigMap and the Event on it.
    assert normalized_rules(roles[NAMESPACE]["rules"]) == sorted([
        ("", "configmaps", "get", ("slmfleet-deprecations",)), ("", "events", "create", ()),
        ("", "events", "patch", ()), ("events.k8s.io", "events", "create", ()), ("events.k8s.io", "events", "patch", ())])
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
                and d["metadata"]["name"] != LEASE_ROLE]
    assert len(bindings) == 4
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "slmfleet-operator", "namespace": NAMESPACE}]
        ns = binding["metadata"].get("namespace")
        target = cluster_role if binding["kind"] == "ClusterRoleBinding" else roles[ns]
        assert binding["roleRef"]["name"] == target["metadata"]["name"]
    # The operator watches what it may act on.
    assert operator_config(docs).namespaces == ["team-a", "team-b"]


def test_namespaced_rbac_when_the_release_namespace_is_watched(helm, tmp_path):
    docs = render(helm, tmp_path, {"rbac": {"scope": "namespaced"}, "watchNamespaces": [NAMESPACE]})
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] != LEASE_ROLE]
    assert [d["metadata"]["namespace"] for d in roles] == [NAMESPACE]


def test_rbac_and_service_account_can_be_left_to_others(helm, tmp_path):
    docs = render(helm, tmp_path, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}})
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                                                   "ServiceAccount")]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


# ------------------------------------------------------------------ monitoring, network

def test_monitors(helm, tmp_path):
    values = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                          "podMonitor": {"enabled": True}}}
    docs = render(helm, tmp_path, values)
    service_monitor = one(docs, "ServiceMonitor")
    assert service_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert service_monitor["metadata"]["labels"]["release"] == "prom"
    service = one(docs, "Service")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    pod_monitor = one(docs, "PodMonitor")
    # It selects the pods the builders create, on the port they name.
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= revision_labels("m", "0123456789").items()
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == PORT_NAME
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    docs = render(helm, tmp_path, deep_merge(values, {"watchNamespaces": ["team-a"]}))
    assert one(docs, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert not [d for d in render(helm, tmp_path) if d["kind"] in ("ServiceMonitor", "PodMonitor")]


def test_network_policy(helm, tmp_path):
    assert not [d for d in render(helm, tmp_path) if d["kind"] == "NetworkPolicy"]
    values = {"networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [6443]},
                                "s3Endpoints": [{"cidr": "10.20.0.0/24", "ports": [9000]}]},
              "config": {"vllmPort": 8001}, "watchNamespaces": ["team-a"]}
    docs = render(helm, tmp_path, values)
    policy = one(docs, "NetworkPolicy")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http-metrics", "protocol": "TCP"}] and "from" not in ingress
    egress = policy["spec"]["egress"]
    ports = {(p["port"], p["protocol"]) for rule in egress for p in rule["ports"]}
    assert {(6443, "TCP"), (53, "UDP"), (53, "TCP"), (8001, "TCP"), (9000, "TCP")} == ports
    api = next(rule for rule in egress if rule["ports"][0]["port"] == 6443)
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    vllm = next(rule for rule in egress if rule["ports"][0]["port"] == 8001)
    assert vllm["to"][0]["podSelector"]["matchLabels"].items() <= revision_labels("m", "0123456789").items()
    assert vllm["to"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a"]
    s3 = next(rule for rule in egress if rule["ports"][0]["port"] == 9000)
    assert s3["to"] == [{"ipBlock": {"cidr": "10.20.0.0/24"}}]
    # Restricting who scrapes still lets `helm test` in.
    docs = render(helm, tmp_path, deep_merge(values, {"networkPolicy": {"metricsFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}}))
    [ingress] = one(docs, "NetworkPolicy")["spec"]["ingress"]
    test_labels = one(docs, "Pod")["metadata"]["labels"]
    assert any(peer.get("podSelector", {}).get("matchLabels", {}).items() <= test_labels.items()
               for peer in ingress["from"] if "podSelector" in peer)


# ------------------------------------------------------------------ helm test

class _Healthz(BaseHTTPRequestHandler):
    def do_GET(self):  # http.server's name
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args):
        pass


def test_helm_test_pod_checks_healthz_through_the_service(helm, tmp_path):
    docs = render(helm, tmp_path)
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [container] = pod["spec"]["containers"]
    assert container["image"] == one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    command = container["command"]
    assert command[:2] == ["python3", "-c"]
    service = one(docs, "Service")
    # Through the Service's ClusterIP, from the kubelet's service-link variables (no DNS needed);
    # the port variable is named after the Service's port.
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    port_name = service["spec"]["ports"][0]["name"].upper().replace("-", "_")
    assert command[3] == f"http://$({prefix}_SERVICE_HOST):$({prefix}_SERVICE_PORT_{port_name})/healthz"
    assert pod["spec"].get("enableServiceLinks", True)
    # The script itself, against a real server.
    server = HTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/healthz"
        result = subprocess.run([sys.executable, "-c", command[2], url], capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert result.returncode == 0 and "200" in result.stdout, result.stdout + result.stderr
    assert not [d for d in render(helm, tmp_path, {"tests": {"enabled": False}}) if d["kind"] == "Pod"]


# ------------------------------------------------------------------ Argo CD: deterministic output

def test_templates_have_no_lookup_random_or_time():
    forbidden = re.compile(r"\b(lookup|rand\w*|uuidv4|now|date\w*|unixEpoch|gen(CA|PrivateKey|SelfSignedCert|SignedCert)\w*)\b")
    for path in (CHART / "templates").rglob("*"):
        if not path.is_file():
            continue
        for action in re.findall(r"\{\{.*?\}\}", path.read_text(), flags=re.DOTALL):
            if action.startswith(("{{/*", "{{- /*")):
                continue
            assert not forbidden.search(action), f"{path.name}: {action}"


def test_rendering_is_deterministic(helm, tmp_path):
    first = template(helm, tmp_path).stdout
    assert first and template(helm, tmp_path).stdout == first


# ------------------------------------------------------------------ packaging (make chart)

def images_json(tmp_path: Path, **changes) -> Path:
    doc = {"images": {
        "slmfleet": {"repository": "slmfleet/slmfleet", "tag": "0.1.0", "digest": OPERATOR_DIGEST, **changes},
        "vllm-standin": {"repository": "slmfleet/vllm-standin-test", "tag": "0.1.0", "digest": VLLM_DIGEST},
    }, "revision": "test"}
    path = tmp_path / "images.json"
    path.write_text(json.dumps(doc))
    return path


def test_package_fills_the_operator_digest_from_images_json(helm, tmp_path):
    target = package.package(images_json(tmp_path), tmp_path / "out", helm)
    assert target == tmp_path / "out" / "slmfleet-0.1.0.tgz"
    with tarfile.open(target) as tar:
        names = tar.getnames()
        values_text = tar.extractfile("slmfleet/values.yaml").read().decode()
    values = yaml.safe_load(values_text)
    assert values["image"]["digest"] == OPERATOR_DIGEST
    assert values["vllm"]["image"]["digest"] == ""  # only the user's mirror knows it
    # Only the digest changed; its comment is kept.
    source = yaml.safe_load((CHART / "values.yaml").read_text())
    source["image"]["digest"] = OPERATOR_DIGEST
    assert values == source and "make chart" in values_text
    assert "slmfleet/templates/crds.yaml" in names and "slmfleet/files/crds/smallmodels.slmfleet.io.yaml" in names
    assert "slmfleet/values.schema.json" in names
    assert not [n for n in names if n.startswith("slmfleet/ci/") or n.endswith(".go")]
    # The package installs once the vLLM digest is set, and says what is missing until then.
    result = run_helm(helm, "template", "slmfleet", str(target), "--kube-version", KUBE_VERSION)
    assert result.returncode != 0 and f"at '/vllm/image/digest': '' {SCHEMA_MESSAGE}" in result.stderr
    assert "/image/digest'" not in result.stderr.replace("/vllm/image/digest'", "")
    result = run_helm(helm, "template", "slmfleet", str(target), "--kube-version", KUBE_VERSION,
                      "--set", f"vllm.image.digest={VLLM_DIGEST}")
    assert result.returncode == 0, result.stderr
    assert f"slmfleet/slmfleet:0.1.0@{OPERATOR_DIGEST}" in result.stdout


@pytest.mark.parametrize("changes, message", [
    ({"digest": "sha256:1234"}, "is not sha256:<64 hex>"),
    ({"tag": "0.2.0"}, "images.slmfleet.tag"),
    ({"repository": "other/slmfleet"}, "images.slmfleet.repository"),
])
def test_package_refuses_an_image_that_is_not_the_charts(helm, tmp_path, changes, message):
    with pytest.raises(package.PackageError, match=re.escape(message)):
        package.package(images_json(tmp_path, **changes), tmp_path / "out", helm)


def test_package_needs_the_image_build(helm, tmp_path):
    with pytest.raises(package.PackageError, match="build the images first"):
        package.package(tmp_path / "missing.json", tmp_path / "out", helm)


def test_with_digest_edits_only_the_operator_images_digest():
    text = 'image:\n  repository: a/b\n  digest: ""  # filled\nvllm:\n  image:\n    digest: ""\n'
    assert package.with_digest(text, OPERATOR_DIGEST) == (
        f'image:\n  repository: a/b\n  digest: {OPERATOR_DIGEST}  # filled\nvllm:\n  image:\n    digest: ""\n')
    with pytest.raises(package.PackageError):
        package.with_digest('vllm:\n  image:\n    digest: ""\n', OPERATOR_DIGEST)


def test_the_operator_listens_on_every_interface_only_when_asked(helm, tmp_path):
    docs = render(helm, tmp_path, {"metrics": {"bindAddress": "0.0.0.0"}})
    [container] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--metrics-host=0.0.0.0" in container["args"]
