"""The pure builders: desired Deployments and Services of a model revision, and their `vllm serve` args."""

from __future__ import annotations

import copy
import json
import re

import pytest

from e2e.node_agent import images
from e2e.standin import vllm as standin
from slmfleet.api.config import OperatorConfig
from slmfleet.api.smallmodel import Placement, SmallModelSpec
from slmfleet.builders import (
    ModelOwner,
    UnsupportedSource,
    build_deployment,
    build_model_service,
    build_revision_service,
    model_endpoint,
    parse_source,
    revision_of,
    selector_labels,
    vllm_serve_args,
)
from slmfleet.builders.weights import LOADER_PEAK_RSS_MIB

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
IMAGE = "registry.internal:5000/vllm/vllm-openai:v0.32.0@sha256:" + "12" * 32
LOADER_IMAGE = "slmfleet/slmfleet:0.1.0@sha256:" + "c" * 64
OWNER = ModelOwner(name="ticket-router", namespace="models", uid="6f1c2c5e-3b7a-4a55-9a8e-0d6a2f1b9c11")
CONFIG = OperatorConfig.model_validate({"vllmImage": IMAGE, "loaderImage": LOADER_IMAGE})
REVISION = "0123456789"


def spec_of(**fields) -> SmallModelSpec:
    """A SmallModel spec in its CR (camelCase) form, with `fields` replacing top-level keys."""
    body = {
        "source": {"uri": "pvc://model-store/qwen3-4b/", "digest": DIGEST},
        "baseModel": "Qwen/Qwen3-4B",
        "serving": {"concurrency": 8},
    }
    body.update(fields)
    return SmallModelSpec.model_validate(body)


def serving_spec(**serving) -> SmallModelSpec:
    return spec_of(serving=serving)


L4 = {
    "gpuResource": "nvidia.com/gpu", "gpuProduct": "NVIDIA-L4", "gpuCount": 1, "tensorParallelSize": 1,
    "gpuMemoryUtilization": "0.9", "maxModelLen": 8192, "maxNumSeqs": 8, "deviceMemoryBytes": 23034 * 2**20,
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
}
H100_TP4 = {
    "gpuResource": "nvidia.com/gpu", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "gpuCount": 4, "tensorParallelSize": 4,
    "gpuMemoryUtilization": "0.92", "maxModelLen": 32768, "maxNumSeqs": 64, "deviceMemoryBytes": 81559 * 2**20,
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"},
}
MIG_3G = {
    "gpuResource": "nvidia.com/mig-3g.20gb", "gpuProduct": "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb", "gpuCount": 1,
    "tensorParallelSize": 1, "gpuMemoryUtilization": "0.88", "maxModelLen": 4096, "maxNumSeqs": 4,
    "deviceMemoryBytes": 19968 * 2**20,
}
PLACEMENTS = {"l4": L4, "h100-tp4": H100_TP4, "mig-3g": MIG_3G}


def placement_of(raw: dict, **changes) -> Placement:
    return Placement.model_validate(raw | changes)


def deployment(spec: SmallModelSpec | None = None, placement: dict = L4, config: OperatorConfig = CONFIG,
               *, hardened: bool = True) -> dict:
    return build_deployment(OWNER, spec or spec_of(), placement_of(placement), REVISION, config, hardened=hardened)


def pod_spec(d: dict) -> dict:
    return d["spec"]["template"]["spec"]


def container(d: dict) -> dict:
    [c] = pod_spec(d)["containers"]
    return c


def env_of(d: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(d)["env"]}


# ------------------------------------------------------------------ Pod Security "restricted"

RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}


def restricted_violations(pod: dict) -> list[str]:
    """What Pod Security `restricted` (v1.34: the baseline checks plus the restricted ones) would
    reject in a pod spec. Applied to templates, so checks of pod-only fields look at the template."""
    problems: list[str] = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{field}=true")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} uses {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    pod_sc = pod.get("securityContext") or {}
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod runAsUser=0")
    if pod_sc.get("seccompProfile", {}).get("type") == "Unconfined":
        problems.append("pod seccompProfile Unconfined")
    if pod_sc.get("windowsOptions", {}).get("hostProcess"):
        problems.append("pod hostProcess")
    for sysctl in pod_sc.get("sysctls") or []:
        problems.append(f"sysctl {sysctl['name']}")  # none of ours are on the safe list; we set none
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or []),
                  *(pod.get("ephemeralContainers") or [])]
    for c in containers:
        name = c["name"]
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation != false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities.add {caps['add']}")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{name}: runAsNonRoot != true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser=0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount {sc['procMount']}")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            problems.append(f"{name}: hostProcess")
        selinux = sc.get("seLinuxOptions") or pod_sc.get("seLinuxOptions") or {}
        if selinux.get("user") or selinux.get("role") or selinux.get("type", "container_t") not in (
            "container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
            problems.append(f"{name}: seLinuxOptions {selinux}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort {port['hostPort']}")
    return problems


@pytest.mark.parametrize("hardened", [True, False], ids=["hardened", "before-the-hardening"])
@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_pods_meet_pod_security_restricted(placement, hardened):
    assert restricted_violations(pod_spec(deployment(placement=placement, hardened=hardened))) == []


@pytest.mark.parametrize("breach, expected", [
    (lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
    (lambda p: p["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    (lambda p: p["containers"][0]["securityContext"].pop("capabilities"), "capabilities.drop"),
    (lambda p: p["securityContext"].pop("runAsNonRoot") and p["containers"][0]["securityContext"].pop("runAsNonRoot"),
     "runAsNonRoot"),
    (lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile"),
    (lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}), "hostPath"),
    (lambda p: p.update(hostNetwork=True), "hostNetwork"),
    (lambda p: p["containers"][0]["ports"][0].update(hostPort=8000), "hostPort"),
])
def test_the_restricted_check_catches_violations(breach, expected):
    pod = copy.deepcopy(pod_spec(deployment()))
    breach(pod)
    problems = restricted_violations(pod)
    assert problems and any(expected in p for p in problems), problems


# ------------------------------------------------------------------ Deployment

def test_same_input_builds_the_identical_deployment():
    first, second = deployment(placement=H100_TP4), deployment(placement=H100_TP4)
    assert first == second
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)  # plain JSON types only
    # Outputs share no mutable state: changing one build does not change the next.
    container(first)["env"].clear()
    pod_spec(first)["tolerations"][0]["key"] = "changed"
    assert deployment(placement=H100_TP4) == second


def test_deployment_name_labels_selector_and_owner():
    d = deployment()
    meta = d["metadata"]
    assert (d["apiVersion"], d["kind"]) == ("apps/v1", "Deployment")
    assert meta["name"] == f"ticket-router-{REVISION}"
    assert meta["namespace"] == "models"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": "ticket-router",
        "app.kubernetes.io/managed-by": "slmfleet",
        "app.kubernetes.io/part-of": "slmfleet",
        "slmfleet.io/model": "ticket-router",
        "slmfleet.io/revision": REVISION,
    }
    assert meta["ownerReferences"] == [{
        "apiVersion": "slmfleet.io/v1alpha1", "kind": "SmallModel", "name": "ticket-router",
        "uid": OWNER.uid, "controller": True, "blockOwnerDeletion": True,
    }]
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector == selector_labels("ticket-router", REVISION)
    template_labels = d["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    assert template_labels == meta["labels"]
    assert d["spec"]["template"]["metadata"]["annotations"] == {"slmfleet.io/placement": "nvidia.com/gpu|NVIDIA-L4|1"}


def test_replicas_and_rollout_strategy():
    one = deployment(serving_spec(replicas=1))
    assert one["spec"]["replicas"] == 1
    assert one["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    three = deployment(serving_spec(replicas=3))
    assert three["spec"]["replicas"] == 3
    assert three["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert deployment(serving_spec(replicas=0))["spec"]["replicas"] == 0
    # Not Progressing=False while a pod may still be Pending and then loading weights.
    assert one["spec"]["progressDeadlineSeconds"] == CONFIG.pending_timeout_seconds + CONFIG.startup_timeout_seconds


def test_container_image_args_only_and_env():
    d = deployment()
    c = container(d)
    assert c["name"] == "vllm"
    assert c["image"] == IMAGE
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert "command" not in c  # the image's ENTRYPOINT is `vllm serve`
    assert c["args"][0] == "/models/model"
    env = env_of(d)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["DO_NOT_TRACK"] == "1"
    cache_mounts = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "cache"]
    assert cache_mounts == ["/var/cache/vllm"]
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT"):
        assert env[var].startswith("/var/cache/vllm"), var
    [cache] = [v for v in pod_spec(d)["volumes"] if v["name"] == "cache"]
    assert "emptyDir" in cache
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_port_follows_the_config():
    config = CONFIG.model_copy(update={"vllm_port": 9000})
    c = container(deployment(config=config))
    assert c["ports"][0]["containerPort"] == 9000
    assert c["args"][c["args"].index("--port") + 1] == "9000"


def test_probes():
    c = container(deployment())
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert 5 <= c["readinessProbe"]["periodSeconds"] <= 10
    assert c["livenessProbe"]["periodSeconds"] == 15
    assert c["livenessProbe"]["failureThreshold"] == 3
    assert c["startupProbe"]["periodSeconds"] == 10
    assert c["startupProbe"]["failureThreshold"] == 180  # 1800 s default

    config = CONFIG.model_copy(update={"startup_timeout_seconds": 605})
    assert container(deployment(config=config))["startupProbe"]["failureThreshold"] == 61  # rounds up


@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_gpu_requests_equal_limits(placement):
    resources = container(deployment(placement=placement))["resources"]
    resource, count = placement["gpuResource"], str(placement["gpuCount"])
    assert resources["requests"][resource] == count
    assert resources["limits"][resource] == count
    assert set(resources["limits"]) == {resource}


def test_cpu_and_memory_requests_fit_the_smallest_gpu_nodes():
    # The L4 pools of e2e/pools/default.yaml: 8 CPUs and 32Gi per single-GPU node.
    requests = container(deployment(placement=L4))["resources"]["requests"]
    assert int(requests["cpu"]) <= 8 - 2  # room for the node's own pods
    assert int(requests["memory"].removesuffix("Gi")) <= 32 - 8


def test_node_affinity_from_both_node_selectors():
    spec = spec_of(resources={"nodeSelector": {"pool": "inference", "nvidia.com/gpu.product": "NVIDIA-L4"}})
    d = deployment(spec, placement=L4)
    terms = pod_spec(d)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L4"]},
        {"key": "pool", "operator": "In", "values": ["inference"]},
    ]}]
    assert "nodeSelector" not in pod_spec(d)


def test_no_affinity_without_node_selectors():
    assert "affinity" not in pod_spec(deployment(placement=MIG_3G))


def test_gpu_toleration():
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(deployment())["tolerations"]


def test_pod_settings():
    pod = pod_spec(deployment())
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert 15 <= pod["terminationGracePeriodSeconds"] <= 60
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["fsGroup"] != 0


def test_image_pull_secrets_reach_every_model_pod():
    assert "imagePullSecrets" not in pod_spec(deployment())
    config = CONFIG.model_copy(update={"image_pull_secrets": ["mirror-pull", "backup.mirror"]})
    pod = pod_spec(deployment(config=config))
    # The loader (init container) and vLLM both pull from the mirror the secrets are for.
    assert pod["imagePullSecrets"] == [{"name": "mirror-pull"}, {"name": "backup.mirror"}]
    assert pod["initContainers"][0]["image"] == LOADER_IMAGE


def init_container(d: dict) -> dict:
    [loader] = pod_spec(d)["initContainers"]
    return loader


def test_pvc_weights_reach_vllm_only_through_the_verifying_loader():
    d = deployment(spec_of(source={"uri": "pvc://model-store/team-a/qwen3-4b", "digest": DIGEST}))
    volumes = {v["name"]: v for v in pod_spec(d)["volumes"]}
    assert volumes["weights-source"]["persistentVolumeClaim"] == {"claimName": "model-store", "readOnly": True}
    assert "emptyDir" in volumes["weights"]
    loader = init_container(d)
    assert loader["image"] == LOADER_IMAGE
    assert loader["args"][:7] == ["load", "--source", "/source/team-a/qwen3-4b", "--digest", DIGEST, "--dest", "/models/model"]
    assert {"name": "weights-source", "mountPath": "/source", "readOnly": True} in loader["volumeMounts"]
    assert "--allow-pickle" not in loader["args"]
    # vLLM never sees the claim: only the verified copy, read-only.
    vllm_mounts = {m["name"]: m for m in container(d)["volumeMounts"]}
    assert "weights-source" not in vllm_mounts
    assert vllm_mounts["weights"] == {"name": "weights", "mountPath": "/models", "readOnly": True}
    assert container(d)["args"][0] == "/models/model"


def test_s3_weights_use_settings_and_secret_references_never_secret_values():
    source = {"uri": "s3://models/qwen3-4b/", "digest": DIGEST, "allowPickle": True,
              "s3": {"endpoint": "https://minio.storage.svc:9000", "region": "eu-west-1",
                     "credentialsSecret": {"name": "minio-creds"}, "caConfigMap": {"name": "minio-ca"}}}
    d = deployment(spec_of(source=source))
    loader = init_container(d)
    assert loader["args"][:3] == ["load", "--source", "s3://models/qwen3-4b/"]
    assert "--allow-pickle" in loader["args"]
    env = {e["name"]: e for e in loader["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.storage.svc:9000"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    assert env["AWS_S3_ADDRESSING_STYLE"]["value"] == "path"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "minio-creds", "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "minio-creds"
    assert env["AWS_CA_BUNDLE"]["value"].startswith("/etc/slmfleet/s3-ca/")
    volumes = {v["name"]: v for v in pod_spec(d)["volumes"]}
    assert volumes["s3-ca"]["configMap"]["name"] == "minio-ca"
    assert "weights-source" not in volumes
    assert loader["terminationMessagePath"] == "/dev/termination-log"


def test_weights_volume_is_sized_from_the_weights():
    d = deployment()
    size = {v["name"]: v for v in pod_spec(d)["volumes"]}["weights"]["emptyDir"]["sizeLimit"]
    assert size.endswith("Gi") and int(size[:-2]) >= 1


@pytest.mark.parametrize("uri, claim, source", [
    ("pvc://store", "store", "/source"),
    ("pvc://store/", "store", "/source"),
    ("pvc://store/a//b/", "store", "/source/a/b"),
])
def test_parse_pvc_source(uri, claim, source):
    parsed = parse_source(uri)
    assert (parsed.claim, parsed.loader_source) == (claim, source)


def test_a_path_cannot_leave_the_volume():
    with pytest.raises(UnsupportedSource, match=r"'\.\.'"):
        parse_source("pvc://store/../etc")


def test_shared_memory_only_with_tensor_parallelism():
    single = deployment(placement=L4)
    assert not [v for v in pod_spec(single)["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert "/dev/shm" not in [m["mountPath"] for m in container(single)["volumeMounts"]]

    tp4 = deployment(placement=H100_TP4)
    [shm] = [v for v in pod_spec(tp4)["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert shm["emptyDir"]["sizeLimit"] == "8Gi"
    assert {"name": shm["name"], "mountPath": "/dev/shm"} in container(tp4)["volumeMounts"]


# ------------------------------------------------------------------ hardening

S3_SOURCE = {"uri": "s3://models/qwen3-4b/", "digest": DIGEST,
             "s3": {"endpoint": "https://minio.storage.svc:9000", "caConfigMap": {"name": "minio-ca"}}}
# The env vars that name a directory the program writes.
WRITTEN_DIRS = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                "TMPDIR", "VLLM_RPC_BASE_PATH")


def writable_mount_of(c: dict, path: str) -> str | None:
    """The writable volume mount `path` is on, if any (longest mount path first)."""
    mounts = sorted(c["volumeMounts"], key=lambda m: len(m["mountPath"]), reverse=True)
    for m in mounts:
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
            return None if m.get("readOnly") else m["name"]
    return None


@pytest.mark.parametrize("source", [spec_of().source.model_dump(by_alias=True), S3_SOURCE], ids=["pvc", "s3"])
@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_hardened_pods_have_read_only_root_file_systems_and_a_volume_for_each_path_they_write(placement, source):
    d = deployment(spec_of(source=source), placement=placement)
    pod = pod_spec(d)
    for c in (*pod["initContainers"], *pod["containers"]):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}
    vllm, loader = container(d), init_container(d)
    env = env_of(d)
    assert env["TMPDIR"] == env["VLLM_RPC_BASE_PATH"] == "/tmp"
    assert env["TRITON_CACHE_DIR"].startswith("/var/cache/vllm/")
    for var in WRITTEN_DIRS:
        assert writable_mount_of(vllm, env[var]) in ("cache", "tmp"), var
    assert writable_mount_of(vllm, "/models/model") is None  # the verified weights stay read-only
    # The loader writes the weights volume (and its termination message, which the kubelet mounts).
    loader_env = {e["name"]: e.get("value") for e in loader["env"]}
    assert writable_mount_of(loader, loader_env["HOME"]) == "tmp"
    assert writable_mount_of(loader, loader["args"][loader["args"].index("--dest") + 1]) == "weights"
    assert {m["name"] for m in loader["volumeMounts"] if not m.get("readOnly")} == {"weights", "tmp"}
    # Every volume a container mounts is one of the pod's.
    for c in (vllm, loader):
        assert {m["name"] for m in c["volumeMounts"]} <= set(volumes), c["name"]


def test_the_loader_has_limits_with_margin_over_its_measured_peak():
    resources = init_container(deployment())["resources"]
    assert resources == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "1Gi"}}
    # An OOM-killed loader starts the pod's start-up over: the limit leaves room over the peak
    # measured with the loader's defaults (builders/weights.py says how).
    assert int(resources["limits"]["memory"].removesuffix("Gi")) * 1024 >= 2.5 * LOADER_PEAK_RSS_MIB


def test_pods_built_before_the_hardening_are_built_as_then():
    # What releases before the hardening built, field by field: a running revision keeps it
    # (planning/desired.py), so the upgrade rolls no pod.
    d = deployment(placement=H100_TP4, hardened=False)
    pod = pod_spec(d)
    for c in (*pod["initContainers"], *pod["containers"]):
        assert "readOnlyRootFilesystem" not in c["securityContext"], c["name"]
        assert "tmp" not in {m["name"] for m in c["volumeMounts"]}
    assert [v["name"] for v in pod["volumes"]] == ["weights", "weights-source", "cache", "dshm"]
    assert init_container(d)["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}}
    assert not {"TMPDIR", "VLLM_RPC_BASE_PATH", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"} & set(env_of(d))
    # Everything else is the same pod.
    hardened = pod_spec(deployment(placement=H100_TP4))
    assert pod["affinity"] == hardened["affinity"] and pod["securityContext"] == hardened["securityContext"]
    assert container(d)["args"] == hardened["containers"][0]["args"]


# ------------------------------------------------------------------ vllm serve args

def serve_args(spec: SmallModelSpec, placement: dict = L4) -> list[str]:
    return container(deployment(spec, placement=placement))["args"]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_vllm_args_follow_the_placement():
    args = serve_args(spec_of(), H100_TP4)
    assert flag(args, "--tensor-parallel-size") == "4"
    assert flag(args, "--gpu-memory-utilization") == "0.92"
    assert flag(args, "--max-model-len") == "32768"
    assert flag(args, "--max-num-seqs") == "64"
    assert flag(args, "--host") == "0.0.0.0"
    assert flag(args, "--port") == "8000"
    assert flag(args, "--dtype") == "auto"
    assert flag(args, "--served-model-name") == "ticket-router"  # the SmallModel's name by default
    assert "--quantization" not in args and "--kv-cache-dtype" not in args


def test_served_model_name_from_the_spec():
    assert flag(serve_args(serving_spec(servedModelName="router/v1")), "--served-model-name") == "router/v1"


@pytest.mark.parametrize("api_value, vllm_value", [
    ("int8", "compressed-tensors"), ("awq", "awq"), ("gptq", "gptq"), ("fp8", "fp8"),
])
def test_quantization_names(api_value, vllm_value):
    assert flag(serve_args(serving_spec(quantization=api_value)), "--quantization") == vllm_value


def test_kv_cache_dtype_only_when_not_auto():
    assert flag(serve_args(serving_spec(kvCacheDtype="fp8_e4m3")), "--kv-cache-dtype") == "fp8_e4m3"


def test_extra_args_come_verbatim_right_after_the_model():
    extra = ["--enable-prefix-caching", "--seed", "7", "--swap-space=8"]
    args = serve_args(serving_spec(extraArgs=extra))
    assert args[1:1 + len(extra)] == extra


def test_the_placement_wins_over_abbreviated_flags_in_extra_args():
    # vLLM's parser accepts unambiguous abbreviations, which the CRD's CEL rule cannot enumerate.
    extra = ["--tensor-parallel=4", "--max-model=131072", "--gpu-memory-util=0.99"]
    parsed = standin.build_parser().parse_args(serve_args(serving_spec(extraArgs=extra)))
    assert (parsed.tensor_parallel_size, parsed.max_model_len) == (1, L4["maxModelLen"])
    assert float(parsed.gpu_memory_utilization) == float(L4["gpuMemoryUtilization"])


def test_vllm_serve_args_directly():
    args = vllm_serve_args("/models/x", "x", placement_of(MIG_3G), serving_spec(dtype="bfloat16").serving, 8123)
    assert args[0] == "/models/x"
    assert flag(args, "--port") == "8123"
    assert flag(args, "--dtype") == "bfloat16"


VARIED_SPECS = {
    "defaults": spec_of(),
    "quantized": serving_spec(quantization="int8", kvCacheDtype="fp8", dtype="float16", servedModelName="r/1"),
    "extra": serving_spec(extraArgs=["--enable-prefix-caching", "--max-num-batched-tokens", "8192", "--seed=7"]),
}


@pytest.mark.parametrize("spec", VARIED_SPECS.values(), ids=VARIED_SPECS.keys())
@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_vllms_parser_accepts_the_args(spec, placement):
    args = serve_args(spec, placement)
    parsed = standin.build_parser().parse_args(args)
    assert parsed.model_tag == args[0]
    assert parsed.tensor_parallel_size == placement["tensorParallelSize"]
    assert parsed.gpu_memory_utilization == float(placement["gpuMemoryUtilization"])
    assert parsed.max_model_len == placement["maxModelLen"]
    assert parsed.max_num_seqs == placement["maxNumSeqs"]
    assert parsed.port == 8000 and parsed.host == "0.0.0.0"
    assert parsed.served_model_name == [spec.serving.served_model_name or OWNER.name]


def test_vllms_parser_rejects_an_unknown_flag(capsys):
    # extraArgs are only pattern-checked by the CRD; vLLM itself is the judge of a flag.
    args = serve_args(serving_spec(extraArgs=["--not-a-vllm-flag"]))
    with pytest.raises(SystemExit) as exit_:
        standin.build_parser().parse_args(args)
    assert exit_.value.code == 2
    assert "unrecognized arguments: --not-a-vllm-flag" in capsys.readouterr().err


def test_a_container_runtime_runs_vllm_serve_with_the_args():
    # Resolved as a runtime would (ENTRYPOINT + args), the pod runs `vllm serve <args>`.
    c = container(deployment())
    # The vLLM image's config says ENTRYPOINT `vllm serve` (as vllm/vllm-openai and the test
    # stand-in image both do); the pod gives args only.
    vllm = images.ImageSpec(entrypoint=("vllm", "serve"), cmd=(), executables=images.STANDINS["slmfleet/vllm-standin-test"])
    argv = images.resolve_argv(vllm, c.get("command"), c["args"])
    assert argv == [*images.VLLM_STANDIN, "serve", *c["args"]]
    assert "command" not in c


# ------------------------------------------------------------------ Services

def test_revision_service_selects_the_revisions_pods():
    d = deployment()
    svc = build_revision_service(OWNER, REVISION, CONFIG)
    assert (svc["apiVersion"], svc["kind"]) == ("v1", "Service")
    assert svc["metadata"]["name"] == d["metadata"]["name"]
    assert svc["metadata"]["namespace"] == "models"
    assert svc["metadata"]["labels"] == d["metadata"]["labels"]
    assert svc["metadata"]["ownerReferences"] == [OWNER.owner_reference()]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    # The named target port exists on the container.
    assert "http" in [p["name"] for p in container(d)["ports"]]


def test_model_service_follows_the_serving_revision():
    svc = build_model_service(OWNER, "aaaaaaaaaa", CONFIG)
    assert svc["metadata"]["name"] == "ticket-router"
    assert svc["metadata"]["ownerReferences"] == [OWNER.owner_reference()]
    assert "slmfleet.io/revision" not in svc["metadata"]["labels"]
    assert svc["spec"]["selector"] == {"slmfleet.io/model": "ticket-router", "slmfleet.io/revision": "aaaaaaaaaa"}
    pod_labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= pod_labels.items()  # another revision's pods
    assert build_model_service(OWNER, REVISION, CONFIG)["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["port"] == 8000
    assert build_model_service(OWNER, "aaaaaaaaaa", CONFIG) == svc


def test_model_endpoint():
    assert model_endpoint(OWNER, CONFIG) == "http://ticket-router.models.svc:8000/v1"


def test_owner_from_metadata():
    meta = {"name": "m", "namespace": "ns", "uid": "u", "generation": 3, "labels": {}}
    assert ModelOwner.from_metadata(meta) == ModelOwner("m", "ns", "u")


# ------------------------------------------------------------------ revision

def test_revision_is_ten_lowercase_hex_and_stable():
    revision = revision_of(spec_of())
    assert re.fullmatch(r"[0-9a-f]{10}", revision)
    assert revision_of(spec_of()) == revision


def test_revision_changes_with_the_digest():
    assert revision_of(spec_of(source={"uri": "pvc://model-store/qwen3-4b/", "digest": OTHER_DIGEST})) != \
        revision_of(spec_of())


@pytest.mark.parametrize("change", [
    {"servedModelName": "other"},
    {"maxModelLen": 4096},
    {"concurrency": 16},
    {"dtype": "bfloat16"},
    {"quantization": "awq"},
    {"kvCacheDtype": "fp8"},
    {"extraArgs": ["--enable-prefix-caching"]},
])
def test_revision_changes_with_serving_config(change):
    assert revision_of(serving_spec(**({"concurrency": 8} | change))) != revision_of(serving_spec(concurrency=8))


def test_revision_ignores_replicas_resources_and_defaults_written_out():
    base = revision_of(spec_of())
    assert revision_of(serving_spec(concurrency=8, replicas=5)) == base
    assert revision_of(spec_of(resources={"gpuCount": 2, "gpuProducts": ["NVIDIA-L4"],
                                          "nodeSelector": {"pool": "a"}})) == base
    # Writing a default explicitly is the same spec as leaving it out.
    assert revision_of(serving_spec(concurrency=8, dtype="auto", kvCacheDtype="auto", extraArgs=[])) == base
