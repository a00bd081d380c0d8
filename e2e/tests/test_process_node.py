"""Process nodes run pods' containers as real local processes with honest pod status."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

from kubernetes import client, watch

from e2e.cluster import Cluster, default_state_dir, process_name, processes_with_env
from e2e.tests.conftest import pod_events, pod_gone
from e2e.wait import wait_for


def vllm_image() -> str:
    """The vLLM stand-in's test image on the cluster's registry, by digest."""
    return Cluster(default_state_dir()).image_ref("vllm-standin")

PROCESS_NODE = {"slmfleet.io/node-agent": "process"}


def vllm_pod(name: str, model: Path, extra_args: list[str] | None = None) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"app": name}),
        spec=client.V1PodSpec(
            node_selector=PROCESS_NODE,
            termination_grace_period_seconds=5,
            containers=[client.V1Container(
                name="vllm",
                image=vllm_image(),
                args=["/models/current", "--served-model-name", "tiny", "--port", "8000",
                      "--max-model-len", "2048", "--gpu-memory-utilization", "0.9", *(extra_args or [])],
                env=[client.V1EnvVar(name="HF_HUB_OFFLINE", value="1"),
                     client.V1EnvVar(name="VLLM_NO_USAGE_STATS", value="1")],
                ports=[client.V1ContainerPort(name="http", container_port=8000)],
                readiness_probe=client.V1Probe(http_get=client.V1HTTPGetAction(path="/health", port="http"),
                                               period_seconds=1, failure_threshold=1),
                resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}),
                volume_mounts=[client.V1VolumeMount(name="weights", mount_path="/models/current", read_only=True)],
            )],
            volumes=[client.V1Volume(name="weights", host_path=client.V1HostPathVolumeSource(path=str(model)))],
        ),
    )


def http(url: str, body: dict | None = None, timeout: float = 2.0) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
            return resp.status, json.loads(text) if text.startswith("{") else text
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def processes_with_pod_ip(ip: str) -> list[int]:
    return processes_with_env("SLMFLEET_POD_IP", ip)


def test_vllm_pod_is_ready_only_after_health_answers_and_serves_its_standin(core, process_nodes_free, namespace, model_dir):
    model = model_dir({"What is the capital of France?": "Paris"}, startup_seconds=3)
    core.create_namespaced_pod(namespace, vllm_pod("vllm", model))
    pod = wait_for(lambda: (p := core.read_namespaced_pod("vllm", namespace)).status.pod_ip and p, what="pod IP")
    ip = pod.status.pod_ip
    assert ip.startswith("127.") and core.read_node(pod.spec.node_name).metadata.labels["slmfleet.io/node-agent"] == "process"

    not_ready_while_down = 0
    while True:
        p = core.read_namespaced_pod("vllm", namespace)
        ready = any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        health, _ = http(f"http://{ip}:8000/health")
        if ready:
            break
        if p.status.phase == "Running" and health != 200:
            not_ready_while_down += 1
        assert p.status.phase in ("Pending", "Running")
    # It was seen running but not Ready while /health did not answer, and is Ready once it does.
    assert not_ready_while_down > 0
    assert http(f"http://{ip}:8000/health")[0] == 200

    status, body = http(f"http://{ip}:8000/v1/chat/completions",
                        {"model": "tiny", "messages": [{"role": "user", "content": " What is the capital of France? "}]})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "Paris"
    status, body = http(f"http://{ip}:8000/v1/completions", {"model": "tiny", "prompt": "unknown prompt"})
    assert status == 200 and body["choices"][0]["text"] == "I don't know."
    status, models = http(f"http://{ip}:8000/v1/models")
    assert [m["id"] for m in models["data"]] == ["tiny"]
    status, metrics = http(f"http://{ip}:8000/metrics")
    assert 'vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 2.0' in metrics
    assert "vllm:e2e_request_latency_seconds_bucket" in metrics


def test_killed_process_is_restarted_and_counted(core, process_nodes_free, namespace, model_dir):
    core.create_namespaced_pod(namespace, vllm_pod("vllm", model_dir()))
    pod = wait_for(lambda: (p := core.read_namespaced_pod("vllm", namespace)).status.container_statuses
                   and p.status.container_statuses[0].ready and p, what="pod Ready")
    pids = processes_with_pod_ip(pod.status.pod_ip)
    assert pids, "the container's process should be running"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    restarted = wait_for(lambda: (p := core.read_namespaced_pod("vllm", namespace)).status.container_statuses[0]
                         .restart_count >= 1 and p, what="a restart", timeout=30)
    status = restarted.status.container_statuses[0]
    assert status.last_state.terminated.exit_code == 128 + signal.SIGKILL
    # It comes back (after kubelet's 10s back-off) and is Ready again.
    wait_for(lambda: core.read_namespaced_pod("vllm", namespace).status.container_statuses[0].ready,
             what="Ready after restart", timeout=40)
    assert http(f"http://{pod.status.pod_ip}:8000/health")[0] == 200


def test_failing_init_container_reports_exit_code_and_message_and_blocks_main(core, process_nodes_free, namespace, model_dir):
    pod = vllm_pod("vllm", model_dir())
    pod.spec.restart_policy = "Never"
    pod.spec.init_containers = [client.V1Container(
        name="loader", image="busybox",
        command=["sh", "-c", "echo 'weights.safetensors: sha256 mismatch' > /dev/termination-log; exit 3"])]
    core.create_namespaced_pod(namespace, pod)
    failed = wait_for(lambda: (p := core.read_namespaced_pod("vllm", namespace)).status.phase == "Failed" and p,
                      what="pod Failed")
    init = failed.status.init_container_statuses[0]
    assert init.state.terminated.exit_code == 3
    assert init.state.terminated.reason == "Error"
    assert init.state.terminated.message == "weights.safetensors: sha256 mismatch"
    main = failed.status.container_statuses[0]
    assert main.state.waiting is not None and main.state.running is None and main.state.terminated is None
    assert not processes_with_pod_ip(failed.status.pod_ip)


def test_init_container_failure_with_restart_always_backs_off_without_starting_main(
    core, process_nodes_free, namespace, model_dir
):
    pod = vllm_pod("vllm", model_dir())
    pod.spec.init_containers = [client.V1Container(
        name="loader", image="busybox", command=["sh", "-c", "echo nope > /dev/termination-log; exit 3"])]
    core.create_namespaced_pod(namespace, pod)
    p = wait_for(lambda: (p := core.read_namespaced_pod("vllm", namespace)).status.init_container_statuses
                 and p.status.init_container_statuses[0].restart_count >= 1 and p, what="init restart", timeout=30)
    init = p.status.init_container_statuses[0]
    assert init.last_state.terminated.exit_code == 3 and init.last_state.terminated.message == "nope"
    assert p.status.phase == "Pending"
    assert p.status.container_statuses[0].state.running is None


def test_unknown_vllm_flag_fails_like_vllm(cluster, core, process_nodes_free, namespace, model_dir):
    core.create_namespaced_pod(namespace, vllm_pod("vllm", model_dir(), ["--not-a-vllm-flag"]))
    p = wait_for(lambda: (p := core.read_namespaced_pod("vllm", namespace)).status.container_statuses
                 and (p.status.container_statuses[0].state.terminated or p.status.container_statuses[0].last_state.terminated)
                 and p, what="container exit")
    s = p.status.container_statuses[0]
    term = s.state.terminated or s.last_state.terminated
    assert term.exit_code == 2
    out = (cluster.dir / "nodes" / p.spec.node_name / "pods" / p.metadata.uid / "containers" / "vllm" / "output.log").read_text()
    assert "vllm serve: error: unrecognized arguments: --not-a-vllm-flag" in out


def test_deleting_the_pod_stops_its_process(core, process_nodes_free, namespace, model_dir):
    core.create_namespaced_pod(namespace, vllm_pod("vllm", model_dir()))
    pod = wait_for(lambda: (p := core.read_namespaced_pod("vllm", namespace)).status.container_statuses
                   and p.status.container_statuses[0].ready and p, what="pod Ready")
    ip = pod.status.pod_ip
    assert processes_with_pod_ip(ip)
    core.delete_namespaced_pod("vllm", namespace)

    wait_for(lambda: pod_gone(core, namespace, "vllm"), what="pod deleted", timeout=30)
    assert not processes_with_pod_ip(ip)
    assert http(f"http://{ip}:8000/health")[0] == 0
    reasons = {e.reason for e in pod_events(core, namespace, "vllm")}
    assert {"Started", "Killing"} <= reasons


def test_every_cluster_process_carries_the_marker(cluster):
    # `down` relies on the marker; the control plane and agents must all carry it.
    pids = cluster.our_processes()
    # A short-lived process (a probe's) may exit between the scan and the read: named "(exited)".
    names = {process_name(p).split()[0] for p in pids}
    assert {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"} <= names


def test_deletion_waits_the_grace_period_then_kills(core, process_nodes_free, namespace):
    """SIGTERM first; a container that survives it gets SIGKILL once the grace period is over. The
    status the agent writes before the final delete shows both: the message the container's TERM
    handler wrote, and exit code 137 (128 + SIGKILL)."""
    core.create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name="stubborn"),
        spec=client.V1PodSpec(
            node_selector=PROCESS_NODE, termination_grace_period_seconds=2,
            containers=[client.V1Container(name="main", image="busybox",
                                           command=["sh", "-c", "trap 'echo TERM received > /dev/termination-log' TERM; "
                                                    "while true; do sleep 0.2; done"])])))
    wait_for(lambda: (p := core.read_namespaced_pod("stubborn", namespace)).status.container_statuses
             and p.status.container_statuses[0].state.running, what="running")
    rv = core.read_namespaced_pod("stubborn", namespace).metadata.resource_version
    core.delete_namespaced_pod("stubborn", namespace)
    terminated = []
    stream = watch.Watch().stream(core.list_namespaced_pod, namespace, field_selector="metadata.name=stubborn",
                                  resource_version=rv, timeout_seconds=120)
    for event in stream:
        statuses = event["object"].status.container_statuses or []
        if statuses and statuses[0].state.terminated:
            terminated.append(statuses[0].state.terminated)
        if event["type"] == "DELETED":
            break
    assert terminated, "the agent reports the container's termination before deleting the pod"
    assert terminated[-1].exit_code == 128 + signal.SIGKILL
    assert terminated[-1].message == "TERM received"


def test_a_missing_secret_is_waited_for_as_the_kubelet_does(core, process_nodes_free, namespace, model_dir):
    pod = vllm_pod("needs-secret", model_dir())
    pod.spec.containers[0].env.append(client.V1EnvVar(name="TOKEN", value_from=client.V1EnvVarSource(
        secret_key_ref=client.V1SecretKeySelector(name="late", key="token"))))
    core.create_namespaced_pod(namespace, pod)

    def waiting_reason():
        status = core.read_namespaced_pod("needs-secret", namespace).status
        states = status.container_statuses or []
        return states and states[0].state.waiting and states[0].state.waiting.reason

    wait_for(lambda: waiting_reason() == "CreateContainerConfigError", 30, what="CreateContainerConfigError")
    core.create_namespaced_secret(namespace, {"metadata": {"name": "late"}, "stringData": {"token": "t"}})
    wait_for(lambda: any(c.type == "Ready" and c.status == "True"
                         for c in core.read_namespaced_pod("needs-secret", namespace).status.conditions or []),
             60, what="the pod started once the Secret exists")


def test_a_volume_that_cannot_be_mounted_yet_is_retried_as_the_kubelet_does(core, process_nodes_free, namespace, model_dir):
    """A Secret volume whose Secret comes after the pod (as `kube-root-ca.crt` may in a new namespace):
    the containers wait in ContainerCreating with a FailedMount Event, then start once it exists."""
    pod = vllm_pod("needs-volume", model_dir())
    pod.spec.volumes.append(client.V1Volume(name="token", secret=client.V1SecretVolumeSource(secret_name="later")))
    pod.spec.containers[0].volume_mounts.append(client.V1VolumeMount(name="token", mount_path="/var/run/token"))
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: "FailedMount" in {e.reason for e in pod_events(core, namespace, "needs-volume")}, 30,
             what="FailedMount event")
    [state] = core.read_namespaced_pod("needs-volume", namespace).status.container_statuses
    assert state.state.waiting.reason == "ContainerCreating"
    core.create_namespaced_secret(namespace, {"metadata": {"name": "later"}, "stringData": {"token": "t"}})
    wait_for(lambda: any(c.type == "Ready" and c.status == "True"
                         for c in core.read_namespaced_pod("needs-volume", namespace).status.conditions or []),
             60, what="the pod started once its volume could be mounted")
