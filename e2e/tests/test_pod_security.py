"""PodSecurity admission is live: a `restricted` namespace rejects a privileged pod, and admits a
model's pods, which run hardened (read-only root file systems, the loader's limits) on a process
node that enforces the read-only root."""

import json
import os
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from e2e.tests.test_weights import (
    GROUP,
    PLURAL,
    VERSION,
    chat,
    cleanup_models,  # noqa: F401 - the fixture, used by name
    credentials_secret,
    model_files,
    pods_of,
    s3_model,
    upload,
    wait_condition,
)

RESTRICTED = {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                      "pod-security.kubernetes.io/enforce-version": "latest"}}}


def restricted_compliant(name: str) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            security_context=client.V1PodSecurityContext(run_as_non_root=True, run_as_user=1000,
                                                         seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault")),
            containers=[client.V1Container(
                name="main", image="busybox",
                security_context=client.V1SecurityContext(
                    allow_privilege_escalation=False, capabilities=client.V1Capabilities(drop=["ALL"])))],
        ),
    )


def test_restricted_namespace_rejects_privileged_pod_and_admits_a_compliant_one(core, namespace):
    core.patch_namespace(namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    privileged = client.V1Pod(
        metadata=client.V1ObjectMeta(name="privileged"),
        spec=client.V1PodSpec(containers=[client.V1Container(
            name="main", image="busybox", security_context=client.V1SecurityContext(privileged=True))]),
    )
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(namespace, privileged)
    assert err.value.status == 403
    message = json.loads(err.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert 'privileged (container "main" must not set securityContext.privileged=true)' in message
    # The same namespace admits a pod that meets the profile: the rejection was the policy's.
    core.create_namespaced_pod(namespace, restricted_compliant("compliant"))


def processes_of(pod_name: str) -> list[int]:
    """The pids of a pod's running processes on a process node (the agent gives each HOSTNAME=<pod>)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"HOSTNAME={pod_name}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def root_mount_options(pid: int | str) -> set[str]:
    """The per-mount options of / as process `pid` sees it (its topmost mount there)."""
    options = [line.split()[5] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
               if line.split()[4] == "/"]
    return set(options[-1].split(","))


@pytest.mark.usefixtures("cleanup_models")
def test_a_models_pods_run_hardened_in_a_restricted_namespace(operator, s3, crs, core, namespace):
    core.patch_namespace(namespace, RESTRICTED)
    uri, digest = upload(s3, model_files())
    credentials_secret(core, namespace, s3)
    crs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                        s3_model("hardened", uri, digest, s3.endpoint_url))
    # Admitted, the weights loaded and verified, vLLM (the stand-in) serving: with read-only roots.
    wait_condition(crs, namespace, "hardened", "Ready", "True", "Serving", timeout=120)
    [pod] = pods_of(core, namespace, "hardened")
    assert chat(pod.status.pod_ip) == "Paris"
    [loader], [vllm] = pod.spec.init_containers, pod.spec.containers
    for c in (loader, vllm):
        assert c.security_context.read_only_root_filesystem is True, c.name
        assert {m.mount_path for m in c.volume_mounts if m.name == "tmp"} == {"/tmp"}, c.name
    assert loader.resources.limits == {"cpu": "2", "memory": "1Gi"}
    assert loader.resources.requests == {"cpu": "1", "memory": "1Gi"}
    [tmp] = [v for v in pod.spec.volumes if v.name == "tmp"]
    assert tmp.empty_dir.size_limit == "1Gi"
    env = {e.name: e.value for e in vllm.env}
    assert env["TMPDIR"] == env["VLLM_RPC_BASE_PATH"] == "/tmp"
    assert env["TRITON_CACHE_DIR"].startswith("/var/cache/vllm/")
    [loaded] = pod.status.init_container_statuses
    assert loaded.state.terminated.exit_code == 0 and digest in (loaded.state.terminated.message or "")
    if os.geteuid() != 0:
        pytest.skip("the process node enforces readOnlyRootFilesystem only as root (mount namespaces)")
    # The process node ran vLLM with / read-only in its own mount namespace, and only there.
    [server] = processes_of(pod.metadata.name)
    assert "ro" in root_mount_options(server)
    assert "rw" in root_mount_options("self")
