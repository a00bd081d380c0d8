import pytest

from e2e.node_agent import images, registry, spec
from e2e.node_agent.agent import PodIPs


@pytest.mark.parametrize("image, parts", [
    ("vllm/vllm-openai", ("docker.io", "vllm/vllm-openai", "latest", None)),
    ("vllm/vllm-openai:v0.11.0", ("docker.io", "vllm/vllm-openai", "v0.11.0", None)),
    ("registry.internal:5000/vllm/vllm-openai@sha256:" + "a" * 64,
     ("registry.internal:5000", "vllm/vllm-openai", None, "sha256:" + "a" * 64)),
    ("127.0.0.1:16449/slmfleet/slmfleet:0.1.0@sha256:" + "b" * 64,
     ("127.0.0.1:16449", "slmfleet/slmfleet", "0.1.0", "sha256:" + "b" * 64)),
    ("busybox", ("docker.io", "library/busybox", "latest", None)),
    ("localhost/slmfleet/slmfleet:dev", ("localhost", "slmfleet/slmfleet", "dev", None)),
])
def test_references_parse_with_dockers_defaults(image, parts):
    ref = registry.parse_reference(image)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == parts


def test_a_malformed_digest_is_a_pull_error():
    with pytest.raises(registry.PullError, match="invalid reference format"):
        registry.parse_reference("127.0.0.1:5000/x@sha256:abc")


def _pulled(repo: str, config: dict) -> images.ImageSpec:
    ref = registry.parse_reference(f"127.0.0.1:5000/{repo}:1@sha256:" + "c" * 64)
    return images.from_pulled(registry.PulledImage(ref, "sha256:" + "c" * 64, config))


def test_entrypoint_and_args_resolve_like_a_container_runtime_from_the_pulled_config():
    vllm = _pulled("slmfleet/vllm-standin-test", {"Entrypoint": ["vllm", "serve"], "User": "65532"})
    # No command: the image's ENTRYPOINT (`vllm serve`) plus args.
    argv = images.resolve_argv(vllm, None, ["/models", "--port", "8000"])
    assert argv == [*images.VLLM_STANDIN, "serve", "/models", "--port", "8000"]
    # command replaces ENTRYPOINT; the API-server module form reaches the same stand-in.
    argv = images.resolve_argv(vllm, ["python3", "-m", "vllm.entrypoints.openai.api_server"], ["--model", "/m"])
    assert argv == [*images.VLLM_STANDIN, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    # An image whose config says otherwise runs otherwise: the table does not decide the entrypoint.
    other = _pulled("slmfleet/slmfleet", {"Entrypoint": ["slmfleet"], "Cmd": ["--help"]})
    assert images.resolve_argv(other, None, None)[1:] == ["--help"]
    assert images.resolve_argv(other, None, ["load", "x"])[1:] == ["load", "x"]
    # busybox (preloaded): no ENTRYPOINT, CMD sh; args replace CMD.
    busybox = images.preloaded("busybox")
    assert busybox is not None and images.resolve_argv(busybox, ["sh", "-c", "exit 3"], None)[1:] == ["-c", "exit 3"]
    # A mirror's organisation prefix does not hide the stand-in.
    mirrored = _pulled("mirror/slmfleet/vllm-standin-test", {"Entrypoint": ["vllm", "serve"]})
    assert images.resolve_argv(mirrored, None, ["/m"])[-2:] == ["serve", "/m"]


def test_the_image_config_gives_env_user_and_image_id():
    image = _pulled("slmfleet/slmfleet", {"Env": ["PATH=/usr/bin", "HF_HUB_OFFLINE=1"], "User": "65532:65532"})
    assert image.env == {"PATH": "/usr/bin", "HF_HUB_OFFLINE": "1"}
    assert image.user == "65532:65532"
    assert image.image_id == "127.0.0.1:5000/slmfleet/slmfleet@sha256:" + "c" * 64


def test_only_named_preloaded_images_skip_the_pull():
    assert images.preloaded("docker.io/library/busybox:1.37") is not None
    assert images.preloaded("busybox@sha256:" + "d" * 64) is None  # a digest must come from a registry
    assert images.preloaded("vllm/vllm-openai:v0.11.0") is None
    assert images.preloaded("127.0.0.1:5000/busybox") is None


def test_unknown_executables_fail_like_a_runtime():
    vllm = _pulled("slmfleet/vllm-standin-test", {"Entrypoint": ["vllm", "serve"]})
    with pytest.raises(images.ExecError, match='exec: "bash": executable file not found'):
        images.resolve_argv(vllm, ["bash"], None)
    with pytest.raises(images.ExecError, match="no command specified"):
        images.resolve_argv(_pulled("slmfleet/slmfleet", {}), None, None)


@pytest.mark.parametrize("user, run_as_user, root, error", [
    ("65532:65532", None, False, None),
    ("", None, True, None),          # no USER: root
    ("root", None, True, None),
    ("0", None, True, None),
    ("nonroot", None, False, "non-numeric user (nonroot)"),
    ("", 1000, False, None),         # the pod's runAsUser wins over the image
    ("65532", 0, True, None),
])
def test_run_as_non_root_is_checked_against_the_image_user_as_the_kubelet_does(user, run_as_user, root, error):
    is_root, message = images.runs_as_root(_pulled("slmfleet/slmfleet", {"User": user}), run_as_user)
    assert is_root == root
    assert (message is None) == (error is None) and (error is None or error in message)


@pytest.mark.parametrize("image, policy", [
    ("busybox", "Always"), ("busybox:latest", "Always"), ("busybox:1.37", "IfNotPresent"),
    ("127.0.0.1:5000/a/b@sha256:" + "e" * 64, "IfNotPresent"), ("127.0.0.1:5000/a/b", "Always"),
])
def test_default_pull_policy_is_the_api_servers(image, policy):
    assert spec.default_pull_policy(image) == policy


def test_pull_secrets_match_the_registry_host():
    import base64
    import json
    auth = base64.b64encode(b"u:p").decode()
    secret = {".dockerconfigjson": json.dumps({"auths": {"https://127.0.0.1:5000": {"auth": auth},
                                                         "other.example": {"username": "x", "password": "y"}}})}
    assert registry.docker_config_auth([secret], "127.0.0.1:5000") == "Basic " + auth
    assert registry.docker_config_auth([secret], "other.example") == "Basic " + base64.b64encode(b"x:y").decode()
    assert registry.docker_config_auth([secret], "third.example") is None
    assert registry.docker_config_auth([{".dockerconfigjson": "not json"}], "127.0.0.1:5000") is None


def test_service_account_mounts_are_bind_mounted_at_their_fixed_path_only():
    argv = ["python3", "-m", "x"]
    assert spec.mount_namespace_argv({"/models": "/h/m"}, argv, set()) == argv
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    wrapped = spec.mount_namespace_argv({sa: "/h/token", "/models": "/h/m"}, argv, {sa})
    assert wrapped[:5] == ["unshare", "--mount", "--propagation", "private", "sh"]
    assert wrapped[-3:] == argv
    assert wrapped[-5:-3] == ["/run/secrets/kubernetes.io/serviceaccount", "/h/token"]
    assert "remount,bind,ro" in wrapped[6] and "/h/m" not in wrapped


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


def test_service_links_are_the_kubelets_variables():
    svc = {"metadata": {"name": "slmfleet-operator"},
           "spec": {"clusterIP": "127.62.0.9", "ports": [{"name": "http-metrics", "port": 8080, "protocol": "TCP"}]}}
    headless = {"metadata": {"name": "db"}, "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}}
    env = spec.service_link_env([svc, headless])
    assert env == {
        "SLMFLEET_OPERATOR_SERVICE_HOST": "127.62.0.9",
        "SLMFLEET_OPERATOR_SERVICE_PORT": "8080",
        "SLMFLEET_OPERATOR_SERVICE_PORT_HTTP_METRICS": "8080",
        "SLMFLEET_OPERATOR_PORT": "tcp://127.62.0.9:8080",
        "SLMFLEET_OPERATOR_PORT_8080_TCP": "tcp://127.62.0.9:8080",
        "SLMFLEET_OPERATOR_PORT_8080_TCP_PROTO": "tcp",
        "SLMFLEET_OPERATOR_PORT_8080_TCP_PORT": "8080",
        "SLMFLEET_OPERATOR_PORT_8080_TCP_ADDR": "127.62.0.9",
    }


def test_the_service_proxy_routes_cluster_ips_to_ready_endpoints_only():
    import ipaddress

    from e2e import service_proxy
    services = [
        {"metadata": {"name": "op", "namespace": "ns"},
         "spec": {"clusterIP": "127.62.0.9", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}},
        {"metadata": {"name": "outside", "namespace": "ns"},
         "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}},  # never listened on: not loopback
        {"metadata": {"name": "headless", "namespace": "ns"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}},
    ]
    assert service_proxy.desired_listeners(services, ipaddress.IPv4Network("127.62.0.0/16")) == {
        ("127.62.0.9", 8080): ("ns", "op", "http")}
    def pod(ip: str, ready: bool, labels: dict, namespace: str = "ns", deleting: bool = False) -> dict:
        meta = {"namespace": namespace, "labels": labels, **({"deletionTimestamp": "x"} if deleting else {})}
        return {"metadata": meta, "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 18080}]}]},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]}}

    op = dict(services[0], spec=dict(services[0]["spec"], selector={"app": "op"},
                                     ports=[{"name": "http", "port": 8080, "targetPort": "http"}]))
    pods = [pod("127.64.0.5", True, {"app": "op", "x": "y"}), pod("127.64.0.6", False, {"app": "op"}),
            pod("127.64.0.7", True, {"app": "other"}), pod("127.64.0.8", True, {"app": "op"}, namespace="elsewhere"),
            pod("127.64.0.9", True, {"app": "op"}, deleting=True)]
    assert service_proxy.ready_endpoints(op, "http", pods) == [("127.64.0.5", 18080)]
    numeric = dict(op, spec=dict(op["spec"], ports=[{"name": "http", "port": 8080, "targetPort": 9000}]))
    assert service_proxy.ready_endpoints(numeric, "http", pods) == [("127.64.0.5", 9000)]
    unselected = dict(op, spec={k: v for k, v in op["spec"].items() if k != "selector"})
    assert service_proxy.ready_endpoints(unselected, "http", pods) == []


def test_the_local_cluster_never_dials_off_loopback():
    from e2e import service_proxy
    with pytest.raises(ValueError, match="loopback"):
        registry.Registry("10.1.2.3:5000")
    with pytest.raises(ValueError, match="loopback"):
        service_proxy.ServiceProxy.__init__(object.__new__(service_proxy.ServiceProxy), __file__, "10.96.0.0/12")
    svc = {"metadata": {"name": "op", "namespace": "ns"},
           "spec": {"clusterIP": "127.62.0.9", "selector": {"app": "op"}, "ports": [{"name": "h", "port": 80}]}}
    pod = {"metadata": {"namespace": "ns", "labels": {"app": "op"}}, "spec": {},
           "status": {"podIP": "10.0.0.5", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert service_proxy.ready_endpoints(svc, "h", [pod]) == []
    pod["status"]["podIP"] = "127.64.0.5"
    assert service_proxy.ready_endpoints(svc, "h", [pod]) == [("127.64.0.5", 80)]
