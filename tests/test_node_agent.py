import pytest

from e2e.node_agent import images, spec
from e2e.node_agent.agent import PodIPs


@pytest.mark.parametrize("image, repo", [
    ("vllm/vllm-openai", "vllm/vllm-openai"),
    ("vllm/vllm-openai:v0.11.0", "vllm/vllm-openai"),
    ("registry.internal:5000/vllm/vllm-openai@sha256:" + "a" * 64, "vllm/vllm-openai"),
    ("docker.io/library/busybox:1.37", "busybox"),
    ("localhost/slmfleet/slmfleet:dev", "slmfleet/slmfleet"),
])
def test_repository_strips_registry_tag_and_digest(image, repo):
    assert images.repository(image) == repo


def test_entrypoint_and_args_resolve_like_a_container_runtime():
    # No command: the image's ENTRYPOINT (`vllm serve`) plus args.
    argv = images.resolve_argv("vllm/vllm-openai:v0.11.0", None, ["/models", "--port", "8000"])
    assert argv == [*images.VLLM_STANDIN, "serve", "/models", "--port", "8000"]
    # command replaces ENTRYPOINT; the old API-server module form reaches the same stand-in.
    argv = images.resolve_argv("vllm/vllm-openai", ["python3", "-m", "vllm.entrypoints.openai.api_server"], ["--model", "/m"])
    assert argv == [*images.VLLM_STANDIN, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    # busybox: no ENTRYPOINT, CMD sh; args replace CMD.
    assert images.resolve_argv("busybox", ["sh", "-c", "exit 3"], None)[1:] == ["-c", "exit 3"]
    # An image mirrored under an organisation prefix in a private registry still resolves.
    assert images.resolve_argv("reg.corp/mirror/vllm/vllm-openai:v1", None, ["/m"])[-2:] == ["serve", "/m"]


def test_unknown_images_and_executables_fail_like_a_runtime():
    with pytest.raises(images.ImageError, match="not in the node agent's image map"):
        images.resolve_argv("nginx:latest", None, None)
    with pytest.raises(images.ExecError, match='exec: "bash": executable file not found'):
        images.resolve_argv("vllm/vllm-openai", ["bash"], None)


def test_path_map_rewrites_whole_path_components_longest_first():
    pm = spec.PathMap({"/models": "/h/models", "/models/cache": "/h/cache", "/dev/termination-log": "/h/tl"})
    assert pm.rewrite("/models") == "/h/models"
    assert pm.rewrite("/models/x.json") == "/h/models/x.json"
    assert pm.rewrite("--download-dir=/models/cache/a") == "--download-dir=/h/cache/a"
    assert pm.rewrite("/models2") == "/models2"
    assert pm.rewrite("x/models") == "x/models"
    assert pm.rewrite("echo hi > /dev/termination-log; exit 3") == "echo hi > /h/tl; exit 3"
    assert spec.PathMap({}).rewrite("/models") == "/models"


def test_dependent_variable_expansion():
    env = {"A": "1", "B": "two"}
    assert spec.expand("$(A)-$(B)", env) == "1-two"
    assert spec.expand("$(MISSING)", env) == "$(MISSING)"
    assert spec.expand("$$(A)", env) == "$(A)"


def test_field_refs():
    pod = {"metadata": {"name": "p", "namespace": "ns", "labels": {"app": "x"}},
           "spec": {"nodeName": "n1"}, "status": {"podIP": "127.64.0.2"}}
    assert spec.field_ref(pod, "status.podIP") == "127.64.0.2"
    assert spec.field_ref(pod, "metadata.labels['app']") == "x"
    assert spec.field_ref(pod, "spec.nodeName") == "n1"
    with pytest.raises(ValueError):
        spec.field_ref(pod, "spec.bogus")


def test_back_off_doubles_from_ten_seconds_to_five_minutes():
    assert [spec.backoff_seconds(n) for n in range(0, 8)] == [0, 10, 20, 40, 80, 160, 300, 300]


def test_exit_codes_of_signalled_processes():
    assert spec.exit_code(-9) == 137 and spec.exit_code(-15) == 143 and spec.exit_code(3) == 3


@pytest.mark.parametrize("policy, states, phase", [
    ("Always", [{"running": {}}], "Running"),
    ("Always", [{"waiting": {"reason": "ContainerCreating"}}], "Pending"),
    ("Never", [{"terminated": {"exitCode": 0}}], "Succeeded"),
    ("Never", [{"terminated": {"exitCode": 1}}], "Failed"),
    ("OnFailure", [{"terminated": {"exitCode": 0}}], "Succeeded"),
    ("Always", [{"terminated": {"exitCode": 1}}], "Running"),
])
def test_pod_phase(policy, states, phase):
    assert spec.pod_phase(policy, False, states) == phase


def test_failed_init_container_fails_the_pod():
    assert spec.pod_phase("Never", True, [{"waiting": {}}]) == "Failed"


def test_pod_ips_come_from_the_node_cidr_and_are_reused():
    ips = PodIPs("127.70.0.0/24")
    a = ips.allocate("a")
    b = ips.allocate("b")
    assert a == "127.70.0.2" and b == "127.70.0.3"
    assert ips.allocate("a") == a
    ips.release("a")
    assert ips.allocate("c") == "127.70.0.2"
    assert ips.allocate("d", previous="127.70.0.9") == "127.70.0.9"
