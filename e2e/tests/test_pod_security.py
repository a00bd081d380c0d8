"""PodSecurity admission is live: a `restricted` namespace rejects a privileged pod."""

import json

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException


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
