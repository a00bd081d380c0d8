"""Process nodes pull images from the cluster's loopback registry as a kubelet pulls them, and give
in-cluster clients what a real node gives them (the API server's address, the service account)."""

from __future__ import annotations

import base64
import json
import subprocess

from kubernetes import client

from e2e.cluster import binaries, built_images
from e2e.tests.conftest import pod_events
from e2e.tests.test_process_node import PROCESS_NODE, vllm_pod
from e2e.wait import wait_for

MISSING_DIGEST = "sha256:" + "0" * 64


def _container(core, namespace: str, name: str):
    statuses = core.read_namespaced_pod(name, namespace).status.container_statuses or []
    return statuses[0] if statuses else None


def _waiting_reason(core, namespace: str, name: str) -> str | None:
    c = _container(core, namespace, name)
    return c.state.waiting.reason if c and c.state.waiting else None


def test_an_image_pulled_by_digest_runs_its_config_and_reports_its_image_id(cluster, core, process_nodes_free,
                                                                           namespace, model_dir):
    pod = vllm_pod("vllm", model_dir())
    pod.spec.containers[0].image_pull_policy = "Always"  # pulled now, whatever the node already has
    core.create_namespaced_pod(namespace, pod)
    status = wait_for(lambda: (c := _container(core, namespace, "vllm")) and c.ready and c, what="vLLM Ready")
    built = built_images()["vllm-standin"]
    assert status.image_id == f"{cluster.registry}/{built['repository']}@{built['digest']}"
    messages = [e.message for e in pod_events(core, namespace, "vllm")]
    assert any(m.startswith(f'Successfully pulled image "{cluster.image_ref("vllm-standin")}"') for m in messages)


def test_a_digest_missing_from_the_registry_backs_off_and_a_late_push_is_pulled(cluster, core, process_nodes_free,
                                                                              namespace, model_dir):
    built = built_images()["vllm-standin"]
    # Right repository, wrong digest: not found, as on a mirror that lacks that exact image.
    wrong = f"{cluster.registry}/{built['repository']}:{built['tag']}@{MISSING_DIGEST}"
    pod = vllm_pod("wrong", model_dir())
    pod.spec.containers[0].image = wrong
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: _waiting_reason(core, namespace, "wrong") == "ImagePullBackOff", what="ImagePullBackOff")
    # The Events follow the status the wait saw.
    wanted = {("Pulling", f'Pulling image "{wrong}"'), ("Failed", "Error: ErrImagePull"),
              ("Failed", "Error: ImagePullBackOff")}

    def all_wanted() -> list[tuple[str, str]] | None:
        seen = [(e.reason, e.message) for e in pod_events(core, namespace, "wrong")]
        return seen if wanted <= set(seen) else None

    events = wait_for(all_wanted, 30, 0.2, f"events {wanted}")
    assert any(r == "Failed" and m.startswith(f'Failed to pull image "{wrong}"') and "not found" in m for r, m in events)
    assert not _container(core, namespace, "wrong").image_id

    # A repository pushed only after the pod: the next pull after the back-off finds it.
    late = f"{cluster.registry}/late/{built['repository']}:{built['tag']}"
    pod = vllm_pod("late", model_dir())
    pod.spec.containers[0].image = f"{late}@{built['digest']}"
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: _waiting_reason(core, namespace, "late") in ("ErrImagePull", "ImagePullBackOff"),
             what="the first pull to fail")
    subprocess.run([str(binaries()["crane"]), "push", built["layout"], late], check=True, capture_output=True)
    wait_for(lambda: (c := _container(core, namespace, "late")) and c.ready, timeout=60, what="Ready after the push")


def test_images_from_other_registries_fail_to_pull_naming_the_one_registry_reached(core, process_nodes_free, namespace,
                                                                        model_dir):
    pod = vllm_pod("upstream", model_dir())
    pod.spec.containers[0].image = "docker.io/vllm/vllm-openai:v0.32.0@sha256:" + "1" * 64
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: _waiting_reason(core, namespace, "upstream") in ("ErrImagePull", "ImagePullBackOff"),
             what="ErrImagePull")
    c = _container(core, namespace, "upstream")
    assert "docker.io is not reachable" in (c.state.waiting.message or "")


def _run_to_completion(core, namespace: str, pod: client.V1Pod) -> client.V1ContainerStateTerminated:
    core.create_namespaced_pod(namespace, pod)
    name = pod.metadata.name
    return wait_for(lambda: (c := _container(core, namespace, name)) and c.state.terminated, timeout=60,
                    what=f"{name} to finish")


def test_containers_reach_the_api_server_in_cluster_as_their_service_account(cluster, core, process_nodes_free,
                                                                           namespace):
    # The kubernetes client's own in-cluster loader: KUBERNETES_SERVICE_HOST/PORT and the token and
    # CA at /var/run/secrets/kubernetes.io/serviceaccount, exactly as in a real pod.
    script = (
        "import json, kubernetes.client as k, kubernetes.config as c\n"
        "c.load_incluster_config()\n"
        "review = k.AuthenticationV1Api().create_self_subject_review(k.V1SelfSubjectReview())\n"
        "ns = open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read()\n"
        "open('/dev/termination-log', 'w').write(json.dumps({'user': review.status.user_info.username, 'ns': ns}))\n"
    )
    terminated = _run_to_completion(core, namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name="in-cluster"),
        spec=client.V1PodSpec(node_selector=PROCESS_NODE, restart_policy="Never", containers=[
            client.V1Container(name="main", image="python:3.11", command=["python3", "-c", script])])))
    assert terminated.exit_code == 0, terminated.message
    assert json.loads(terminated.message) == {"user": f"system:serviceaccount:{namespace}:default", "ns": namespace}


def test_pull_secrets_are_read_for_every_pull_and_a_missing_one_is_reported(cluster, core, process_nodes_free,
                                                                          namespace, model_dir):
    auth = base64.b64encode(b"mirror-user:mirror-password").decode()
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="mirror"), type="kubernetes.io/dockerconfigjson",
        string_data={".dockerconfigjson": json.dumps({"auths": {cluster.registry: {"auth": auth}}})}))
    for name, secrets in (("with-secret", ["mirror"]), ("missing-secret", ["mirror", "nowhere"])):
        pod = vllm_pod(name, model_dir())
        pod.spec.image_pull_secrets = [client.V1LocalObjectReference(name=s) for s in secrets]
        pod.spec.containers[0].image_pull_policy = "Always"
        core.create_namespaced_pod(namespace, pod)
    for name in ("with-secret", "missing-secret"):
        wait_for(lambda name=name: (c := _container(core, namespace, name)) and c.ready, what=f"{name} Ready")
    reasons = {name: {(e.reason, e.message) for e in pod_events(core, namespace, name)}
               for name in ("with-secret", "missing-secret")}
    unreadable = ("FailedToRetrieveImagePullSecret", "Unable to retrieve some image pull secrets (nowhere); "
                  "attempting to pull the image may not succeed.")
    assert unreadable in reasons["missing-secret"]
    assert not any(r == "FailedToRetrieveImagePullSecret" for r, _ in reasons["with-secret"])


def test_run_as_non_root_refuses_an_image_that_runs_as_root(core, process_nodes_free, namespace):
    core.create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name="root-image"),
        spec=client.V1PodSpec(node_selector=PROCESS_NODE, containers=[client.V1Container(
            name="main", image="busybox:1.37", command=["sleep", "60"],
            security_context=client.V1SecurityContext(run_as_non_root=True))])))
    wait_for(lambda: _waiting_reason(core, namespace, "root-image") == "CreateContainerConfigError",
             what="CreateContainerConfigError")
    assert "container has runAsNonRoot and image will run as root" in \
        _container(core, namespace, "root-image").state.waiting.message
