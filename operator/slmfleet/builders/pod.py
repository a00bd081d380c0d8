"""The pod template of a revision: one vLLM container on the placement's GPUs.

Pods pass Pod Security `restricted` (non-root, no privilege escalation, no capabilities, the
runtime's default seccomp profile, only non-host volumes), so models can run in locked-down
namespaces.

Hardened pods (`hardened=True`, what every new revision gets) also run both containers with a
read-only root file system, each writable path a volume of the pod for a stated reason, and put
CPU and memory limits on the loader. `hardened=False` builds the pods of operator releases before
that, exactly: planning/desired.py keeps a running revision on the shape its live Deployment has,
so that upgrading the operator does not restart every serving model.
"""

from __future__ import annotations

import math
from typing import Any

from slmfleet.api.config import OperatorConfig
from slmfleet.api.smallmodel import Placement, SmallModelSpec
from slmfleet.builders.labels import PLACEMENT_ANNOTATION, revision_labels
from slmfleet.builders.owner import ModelOwner
from slmfleet.builders.scratch import TMP_DIR, tmp_mount, tmp_volume
from slmfleet.builders.vllm_args import vllm_serve_args
from slmfleet.builders.weights import MODEL_DIR, loader_container, vllm_weights_mount, weights_volumes

CONTAINER_NAME = "vllm"
PORT_NAME = "http"
HEALTH_PATH = "/health"

# The vllm/vllm-openai image runs as root by default; any non-root uid works once HOME and the
# caches point at a writable volume.
RUN_AS_UID = 1000
CACHE_VOLUME = "cache"
CACHE_DIR = "/var/cache/vllm"
# Compile artefacts and kernels only; weights never land here.
CACHE_SIZE_LIMIT = "10Gi"
SHM_VOLUME = "dshm"

STARTUP_PROBE_PERIOD_SECONDS = 10
# Per GPU (whole or MIG slice). The smallest GPU nodes seen in practice, and in the simulated
# fleet (e2e/pools/default.yaml), are 1 GPU, 8 CPUs and 32Gi: a replica must fit beside the
# node's system pods. vLLM's CPU work is tokenisation and scheduling; its host memory is the
# swap space (4 GiB per GPU by default) plus the mmap'ed safetensors pages during loading.
CPU_PER_GPU = 2
MEMORY_GIB_PER_GPU = 16
# NCCL exchanges tensor-parallel activations through /dev/shm; the runtime's default 64Mi is far
# too small. Memory-backed, so it counts against the pod's memory: bounded per GPU.
SHM_GIB_PER_GPU = 2
CPU_SHM_GIB = 1
# GPU Feature Discovery labels every GPU node with its product; CPU placements stay off those nodes.
GPU_NODE_LABEL = "nvidia.com/gpu.product"

GPU_TOLERATIONS = [
    # GPU nodes are commonly tainted so that only pods asking for GPUs land on them.
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
]


def served_model_name(owner: ModelOwner, spec: SmallModelSpec) -> str:
    """The name clients put in the OpenAI `model` field."""
    return spec.serving.served_model_name or owner.name


def build_pod_template(
    owner: ModelOwner,
    spec: SmallModelSpec,
    placement: Placement,
    revision: str,
    config: OperatorConfig,
    weights_disk_bytes: int | None = None,
    *,
    hardened: bool = True,
) -> dict[str, Any]:
    """The Deployment's `spec.template`. Raises UnsupportedSource for a source it cannot load."""
    pod_spec: dict[str, Any] = {
        # vLLM never calls the Kubernetes API: no token in the pod.
        "automountServiceAccountToken": False,
        # Service links would add a dozen env vars per Service in the namespace, one set per model.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": _pod_security_context(),
    }
    if config.image_pull_secrets:
        # The vLLM and loader images come from the same (possibly private) mirror as the operator's.
        pod_spec["imagePullSecrets"] = [{"name": name} for name in config.image_pull_secrets]
    affinity = _node_affinity(placement.node_selector, spec.resources.node_selector,
                              avoid_gpu_nodes=placement.accelerator == "cpu")
    if affinity:
        pod_spec["affinity"] = affinity
    pod_spec["tolerations"] = [dict(t) for t in GPU_TOLERATIONS]
    pod_spec["initContainers"] = [
        loader_container(spec.source, config, _container_security_context(hardened), hardened=hardened)
    ]
    pod_spec["containers"] = [_vllm_container(owner, spec, placement, config, hardened)]
    pod_spec["volumes"] = (
        weights_volumes(spec.source, _disk_bytes(placement, weights_disk_bytes)) + _volumes(placement, hardened)
    )
    # The placement key tells the operator which placement a Pending pod was created for, so pods
    # left over from an earlier placement do not count against the current one.
    metadata = {"labels": revision_labels(owner.name, revision), "annotations": {PLACEMENT_ANNOTATION: placement.key}}
    return {"metadata": metadata, "spec": pod_spec}


def _disk_bytes(placement: Placement, known: int | None) -> int | None:
    """The weights' size on disk: the manifest's total when known. Otherwise twice what vLLM holds
    in memory, since a checkpoint can be stored wider than it is served (fp32 files served in
    bf16, 16-bit files quantized to fp8 on load), and an emptyDir over its limit evicts the pod."""
    if known:
        return known
    return 2 * placement.memory.weights_bytes if placement.memory else None


def _vllm_container(
    owner: ModelOwner, spec: SmallModelSpec, placement: Placement, config: OperatorConfig, hardened: bool
) -> dict[str, Any]:
    return {
        "name": CONTAINER_NAME,
        "image": _vllm_image(placement, config),
        "imagePullPolicy": config.image_pull_policy,
        # args only: the image's ENTRYPOINT is `vllm serve`.
        "args": vllm_serve_args(
            MODEL_DIR, served_model_name(owner, spec), placement, spec.serving, config.vllm_port
        ),
        "env": _env(hardened) + _cpu_env(placement, config),
        "ports": [{"name": PORT_NAME, "containerPort": config.vllm_port, "protocol": "TCP"}],
        "resources": _resources(placement),
        **_probes(config),
        "securityContext": _container_security_context(hardened),
        "volumeMounts": _volume_mounts(placement, hardened),
        # A vLLM that exits during start-up prints the reason last; show it in `kubectl describe`.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _env(hardened: bool) -> list[dict[str, Any]]:
    env = [
        # Air-gapped by design: weights are local and verified, nothing may be fetched or reported.
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "DO_NOT_TRACK", "value": "1"},
        # The pod runs as a uid without a home directory in the image: every cache vLLM, torch,
        # Triton and Hugging Face write goes to the writable cache volume.
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{CACHE_DIR}/.cache"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "VLLM_CACHE_ROOT", "value": f"{CACHE_DIR}/vllm"},
    ]
    if hardened:
        # The root file system is read-only: every path vLLM writes must be a volume.
        env += [
            # Triton's compiled kernels (default ~/.triton/cache; vLLM points it into its own
            # cache only while its compile cache is on) and torch inductor's generated code
            # (default /tmp/torchinductor_<user>): gigabytes at worst, so the cache volume.
            {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
            {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{CACHE_DIR}/torchinductor"},
            # Temp files (Triton builds its launcher stubs in a TemporaryDirectory) and vLLM's RPC
            # IPC sockets (VLLM_RPC_BASE_PATH defaults to the temp dir): the small tmp volume.
            {"name": "TMPDIR", "value": TMP_DIR},
            {"name": "VLLM_RPC_BASE_PATH", "value": TMP_DIR},
        ]
    return env


def _vllm_image(placement: Placement, config: OperatorConfig) -> str:
    if placement.accelerator == "cpu":
        # Planning refuses CPU placements without a CPU image, so it is set here.
        assert config.cpu_vllm_image is not None
        return config.cpu_vllm_image
    return config.vllm_image


def _cpu_env(placement: Placement, config: OperatorConfig) -> list[dict[str, Any]]:
    if placement.accelerator != "cpu":
        return []
    return [
        # The KV cache vLLM's CPU backend allocates, as sized; without it vLLM takes a fraction of
        # the node's whole RAM, well past the pod's memory limit.
        {"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(placement.kv_cache_gib)},
        {"name": "VLLM_CPU_OMP_THREADS_BIND", "value": config.cpu_thread_binding},
        {"name": "OMP_NUM_THREADS", "value": str(placement.gpu_count)},
    ]


def _probes(config: OperatorConfig) -> dict[str, Any]:
    health = {"path": HEALTH_PATH, "port": PORT_NAME}
    return {
        # vLLM opens its port only after the weights are loaded and the KV cache is allocated,
        # which takes minutes; the startup probe holds the other probes off until then.
        "startupProbe": {
            "httpGet": dict(health),
            "periodSeconds": STARTUP_PROBE_PERIOD_SECONDS,
            "timeoutSeconds": 5,
            "failureThreshold": math.ceil(config.startup_timeout_seconds / STARTUP_PROBE_PERIOD_SECONDS),
        },
        "readinessProbe": {
            "httpGet": dict(health),
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        # /health fails when the engine is dead (e.g. a CUDA error); a restart is the cure.
        "livenessProbe": {
            "httpGet": dict(health),
            "periodSeconds": 15,
            "timeoutSeconds": 10,
            "failureThreshold": 3,
        },
    }


def _resources(placement: Placement) -> dict[str, Any]:
    count = placement.gpu_count
    if placement.accelerator == "cpu":
        # Requests equal to limits, in whole cores: a Guaranteed pod, which the kubelet's static CPU
        # manager gives exclusive cores, and a memory limit at what was sized (weights, the KV cache
        # vLLM allocates up front, and the runtime), so one model cannot starve its node's others.
        cpu_memory = {"cpu": str(count), "memory": str(placement.memory_bytes)}
        return {"requests": dict(cpu_memory), "limits": dict(cpu_memory)}
    # Extended resources must have requests equal to limits. CPU and memory are requests only: a
    # memory limit would OOM-kill vLLM on a transient peak while loading weights, after minutes
    # of work, and a CPU limit throttles the scheduler loop that keeps the GPU busy.
    return {
        "requests": {
            placement.gpu_resource: str(count),
            "cpu": str(CPU_PER_GPU * count),
            "memory": f"{MEMORY_GIB_PER_GPU * count}Gi",
        },
        "limits": {placement.gpu_resource: str(count)},
    }


def _node_affinity(*selectors: dict[str, str], avoid_gpu_nodes: bool = False) -> dict[str, Any] | None:
    """Required node affinity: every label of every selector (the placement's and the user's); a
    CPU placement also stays off GPU nodes, whose memory and cores belong to their GPUs' pods."""
    pairs = sorted({(key, value) for selector in selectors for key, value in selector.items()})
    if not pairs and not avoid_gpu_nodes:
        return None
    # One term, all expressions ANDed. Should the two selectors disagree on a key, both
    # expressions stay and the pod is unschedulable, which is what the two constraints mean.
    expressions: list[dict[str, Any]] = [{"key": key, "operator": "In", "values": [value]} for key, value in pairs]
    if avoid_gpu_nodes:
        expressions.append({"key": GPU_NODE_LABEL, "operator": "DoesNotExist"})
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": expressions}]}
        }
    }


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_UID,
        "runAsGroup": RUN_AS_UID,
        "fsGroup": RUN_AS_UID,
        # Without this the kubelet chowns every file of the weights volume on each mount.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context(hardened: bool) -> dict[str, Any]:
    context: dict[str, Any] = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    if hardened:
        context["readOnlyRootFilesystem"] = True
    return context


def _uses_shared_memory(placement: Placement) -> bool:
    # Tensor-parallel workers exchange tensors through /dev/shm; vLLM's CPU backend passes its
    # engine's messages there too. A container's own /dev/shm is 64 MiB.
    return placement.tensor_parallel_size > 1 or placement.accelerator == "cpu"


def _volumes(placement: Placement, hardened: bool) -> list[dict[str, Any]]:
    volumes = [{"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": CACHE_SIZE_LIMIT}}]
    if hardened:
        volumes.append(tmp_volume())
    if _uses_shared_memory(placement):
        size = f"{CPU_SHM_GIB}Gi" if placement.accelerator == "cpu" else f"{SHM_GIB_PER_GPU * placement.gpu_count}Gi"
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": size}})
    return volumes


def _volume_mounts(placement: Placement, hardened: bool) -> list[dict[str, Any]]:
    # What vLLM may write: the cache volume (HOME and every cache, _env), /tmp when the root file
    # system is read-only (temp files, IPC sockets), and /dev/shm for tensor parallelism (NCCL).
    # The weights are read-only.
    mounts = [vllm_weights_mount(), {"name": CACHE_VOLUME, "mountPath": CACHE_DIR}]
    if hardened:
        mounts.append(tmp_mount())
    if _uses_shared_memory(placement):
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    return mounts
