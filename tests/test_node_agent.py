import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from e2e.node_agent import images, registry, spec
from e2e.node_agent.agent import PodIPs
from slmfleet.weights.pin import pin
from tests.standin_servers import REPO, free_port, healthy


@pytest.mark.parametrize("image, parts", [
    ("vllm/vllm-openai", ("docker.io", "vllm/vllm-openai", "latest", None)),
    ("vllm/vllm-openai:v0.32.0", ("docker.io", "vllm/vllm-openai", "v0.32.0", None)),
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
    assert images.preloaded("vllm/vllm-openai:v0.32.0") is None
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


def test_a_read_only_root_binds_every_mount_onto_itself_then_remounts_the_root():
    argv = ["python3", "-m", "x"]
    mounts = {"/models": "/h/weights", "/var/cache/vllm": "/h/cache", "/dev/termination-log": "/h/term"}
    wrapped = spec.mount_namespace_argv(mounts, argv, {"/models"}, read_only_root=True)
    assert wrapped[:5] == ["unshare", "--mount", "--propagation", "private", "sh"]
    assert wrapped[-3:] == argv
    script, words = wrapped[6], wrapped[8:-3]
    assert sorted(words) == ["/h/cache", "/h/term", "/h/weights"]  # paths are arguments, never script text
    steps = script.split("; ")
    binds = [i for i, step in enumerate(steps) if step.startswith("mount --bind")]
    assert len(binds) == 3 and steps.index("mount -o remount,bind,ro /") > max(binds)
    # Only the read-only mount is remounted read-only besides the root.
    weights = f'"${{{words.index("/h/weights") + 1}}}"'
    assert [step for step in steps if step.startswith("mount -o remount")] == [
        f"mount -o remount,bind,ro {weights}", "mount -o remount,bind,ro /"]
    # Without secrets or a read-only root, no wrapper.
    assert spec.mount_namespace_argv(mounts, argv, {"/models"}) == argv


needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="mount namespaces need root (CI and the local cluster run as root)")


def pod_layout(tmp_path: Path) -> dict[str, Path]:
    """A pod's directory as the node agent lays it out: volumes, and a container's termination file."""
    pod = tmp_path / "pods" / "uid"
    paths = {"pod": pod, "cache": pod / "volumes" / "cache", "tmp": pod / "volumes" / "tmp",
             "weights": pod / "volumes" / "weights", "term": pod / "containers" / "c" / "termination-log"}
    for name in ("cache", "tmp", "weights"):
        paths[name].mkdir(parents=True)
    paths["term"].parent.mkdir(parents=True)
    paths["term"].write_text("")
    if os.stat(tmp_path).st_dev != os.stat("/").st_dev:
        pytest.skip("the test's temp dir is not on the root file system, which is what is made read-only")
    return paths


def root_mount_options() -> set[str]:
    """The per-mount options of / in this process's mount namespace (the topmost mount there)."""
    options = [line.split()[5] for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if line.split()[4] == "/"]
    return set(options[-1].split(","))


PROBE = """
probe() {
    if err=$(touch "$1" 2>&1); then echo "$2=writable"
    else case "$err" in *"Read-only file system"*) echo "$2=read-only";; *) echo "$2=$err";; esac; fi
}
probe "$1/outside-the-volumes" root
probe "$2/file" cache
probe "$3/file" weights
echo "the reason" > "$4" && echo term=written
echo waiting; read -r _
"""


@needs_root
def test_a_read_only_root_is_enforced_in_the_containers_mount_namespace_only(tmp_path):
    paths = pod_layout(tmp_path)
    mounts = {"/var/cache/vllm": str(paths["cache"]), "/models": str(paths["weights"]),
              "/dev/termination-log": str(paths["term"])}
    argv = ["sh", "-c", PROBE, "sh", str(paths["pod"]), str(paths["cache"]), str(paths["weights"]), str(paths["term"])]
    wrapped = spec.mount_namespace_argv(mounts, argv, {"/models"}, read_only_root=True)
    with subprocess.Popen(wrapped, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        seen = [proc.stdout.readline().strip() for _ in range(5)]
        assert seen == ["root=read-only", "cache=writable", "weights=read-only", "term=written", "waiting"], (
            seen, proc.stderr.read() if proc.poll() is not None else "")
        # While the container runs, the host's root is as writable as ever for everyone else.
        assert "rw" in root_mount_options()
        (paths["pod"] / "outside-the-volumes").write_text("the agent writes here")
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    assert (paths["cache"] / "file").exists() and not (paths["weights"] / "file").exists()
    assert paths["term"].read_text() == "the reason\n"
    # And after it: nothing of its namespace is left on the host.
    assert "rw" in root_mount_options()
    (paths["pod"] / "after").write_text("still writable")


@needs_root
def test_the_loader_loads_weights_with_a_read_only_root(tmp_path):
    paths = pod_layout(tmp_path)
    source = tmp_path / "store" / "qwen"
    source.mkdir(parents=True)
    (source / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (source / "model.safetensors").write_bytes(os.urandom(3 * 2**20))
    digest = pin(str(source), write=True).digest
    argv = [*images.STANDINS["slmfleet/slmfleet"]["slmfleet"], "load", "--source", str(source), "--digest", digest,
            "--dest", str(paths["weights"] / "model"), "--termination-message-path", str(paths["term"]),
            "--no-progress"]
    mounts = {"/models": str(paths["weights"]), "/source": str(source), "/tmp": str(paths["tmp"]),
              "/dev/termination-log": str(paths["term"])}
    env = {"PATH": os.environ["PATH"], "HOME": str(paths["tmp"]), "TMPDIR": str(paths["tmp"])}
    out = subprocess.run(spec.mount_namespace_argv(mounts, argv, {"/source"}, read_only_root=True),
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == digest
    assert (paths["weights"] / "model" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert digest in paths["term"].read_text()


@needs_root
def test_the_vllm_stand_in_serves_with_a_read_only_root(tmp_path):
    paths = pod_layout(tmp_path)
    model = paths["weights"] / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 8, "max_position_embeddings": 4096}))
    (model / "standin.json").write_text(json.dumps({"default_completion": "read-only", "latency_ms": {"mean": 1}}))
    port = free_port()
    argv = [sys.executable, "-m", "e2e.standin.vllm", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "m"]
    mounts = {"/models": str(paths["weights"]), "/var/cache/vllm": str(paths["cache"]), "/tmp": str(paths["tmp"]),
              "/dev/termination-log": str(paths["term"])}
    # The pod's environment for vLLM (builders/pod.py), its paths as the agent rewrites them.
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": str(paths["cache"]),
           "XDG_CACHE_HOME": str(paths["cache"] / ".cache"), "TMPDIR": str(paths["tmp"]),
           "VLLM_RPC_BASE_PATH": str(paths["tmp"])}
    wrapped = spec.mount_namespace_argv(mounts, argv, {"/models"}, read_only_root=True)
    with subprocess.Popen(wrapped, cwd=paths["pod"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            for _ in range(300):
                if healthy(port) or proc.poll() is not None:
                    break
                time.sleep(0.05)
            assert healthy(port), proc.stdout.read().decode() if proc.poll() is not None else "not healthy in 15 s"
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", data=json.dumps({"model": "m", "prompt": "hi"}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert json.loads(response.read())["choices"][0]["text"] == "read-only"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


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


def test_host_paths_the_runtime_sets_are_not_taken_for_container_paths_under_a_mount():
    # A checkout in /tmp/clone and a pod with a `tmp` volume at /tmp: PYTHONPATH (the runtime's,
    # a host path) stays; TMPDIR and a spec value naming /tmp (container paths) move to the volume.
    paths = spec.PathMap({"/tmp": "/h/pod/volumes/tmp"})
    env = {"PYTHONPATH": "/tmp/clone", "HOME": "/tmp/clone/.e2e-cluster/pod/home", "TMPDIR": "/tmp",
           "CACHE": "/tmp/cache"}
    host = {"PYTHONPATH": "/tmp/clone", "HOME": "/tmp/clone/.e2e-cluster/pod/home"}
    assert spec.container_env(env, paths, host) == {
        "PYTHONPATH": "/tmp/clone", "HOME": "/tmp/clone/.e2e-cluster/pod/home",
        "TMPDIR": "/h/pod/volumes/tmp", "CACHE": "/h/pod/volumes/tmp/cache"}
    # A HOME the pod spec sets under the volume is the container's.
    assert spec.container_env({**env, "HOME": "/tmp"}, paths, host)["HOME"] == "/h/pod/volumes/tmp"


def test_the_vllm_cpu_test_image_runs_the_real_vllm_of_the_host_venv():
    image = _pulled("slmfleet/vllm-cpu-test", {"Entrypoint": ["vllm", "serve"], "User": "65532:65532"})
    assert image.real_vllm
    venv = images.real_vllm_install.venv_dir()
    argv = images.resolve_argv(image, None, ["/models/m", "--port", "8000"])
    assert argv == [str(venv / "bin" / "vllm"), "serve", "/models/m", "--port", "8000"]
    assert images.resolve_argv(image, ["python3", "-c", "x"], None)[0] == str(venv / "bin" / "python")
    assert _pulled("mirror/slmfleet/vllm-cpu-test", {"Entrypoint": ["vllm", "serve"]}).real_vllm
    assert not _pulled("slmfleet/vllm-standin-test", {"Entrypoint": ["vllm", "serve"]}).real_vllm


@pytest.mark.parametrize("args, expected", [
    ([], ["--host", "127.80.0.2"]),
    (["--host", "0.0.0.0", "--port", "8000"], ["--port", "8000", "--host", "127.80.0.2"]),
    (["--host=::", "--port=8000"], ["--port=8000", "--host", "127.80.0.2"]),
    (["--host", "127.0.0.1"], ["--host", "127.80.0.2"]),
    (["--host", "127.80.0.2", "--host", "localhost"], ["--host", "127.80.0.2"]),
])
def test_the_real_vllm_binds_only_the_pod_ip(args, expected):
    vllm = "/venv/bin/vllm"
    assert images.real_vllm_argv([vllm, "serve", "/m", *args], "127.80.0.2") == [vllm, "serve", "/m", *expected]
    assert images.real_vllm_argv([vllm, "--version"], "127.80.0.2") == [vllm, "--version"]


@pytest.mark.parametrize("host, kind", [("10.0.0.5", "an address"), ("127.81.0.2", "a loopback address of another"),
                                        ("example.com", "a host name")])
def test_an_address_the_pod_does_not_have_is_a_start_error(host, kind):
    with pytest.raises(images.ExecError, match=f"--host {host}: {kind}"):
        images.real_vllm_argv(["vllm", "serve", "/m", "--host", host], "127.80.0.2")


def test_the_real_vllm_env_is_offline_and_knows_only_the_pod_ip():
    env = images.real_vllm_env("127.80.0.2")
    assert env["VLLM_HOST_IP"] == env["VLLM_LOOPBACK_IP"] == "127.80.0.2"
    assert env["GLOO_SOCKET_IFNAME"] == "lo"
    assert all(env[k] == "1" for k in ("HF_HUB_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "TRANSFORMERS_OFFLINE"))


def test_a_private_dev_shm_is_a_tmpfs_or_the_pods_volume():
    argv = ["python3", "-c", "x"]
    assert spec.mount_namespace_argv({}, argv, set()) == argv
    script = spec.mount_namespace_argv({}, argv, set(), private_shm=True)[6]
    assert "mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m shm /dev/shm" in script
    wrapped = spec.mount_namespace_argv({"/dev/shm": "/h/shm"}, argv, set(), private_shm=True)
    assert 'mount --bind "${1}" /dev/shm' in wrapped[6] and wrapped[8] == "/h/shm" and wrapped[-3:] == argv


@needs_root
def test_a_containers_dev_shm_is_its_own(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    probe = ("import os, sys; from multiprocessing import shared_memory as s; m = s.SharedMemory(create=True, size=4096); "
             "print(m.name, sorted(os.listdir('/dev/shm')), os.statvfs('/dev/shm').f_blocks * os.statvfs('/dev/shm').f_frsize); "
             "m.close(); m.unlink()")
    before = set(os.listdir("/dev/shm"))
    own = subprocess.run(spec.mount_namespace_argv({}, [sys.executable, "-c", probe], set(), read_only_root=True,
                                                   private_shm=True), capture_output=True, text=True, timeout=30)
    assert own.returncode == 0, own.stderr
    name, listing, size = own.stdout.split(" ", 1)[0], *own.stdout.strip().split(" ", 1)[1].rsplit(" ", 1)
    assert listing == f"[{name.lstrip('/')!r}]" and int(size) == 64 * 2**20  # nothing of the host's, 64Mi
    assert set(os.listdir("/dev/shm")) == before
    volume = subprocess.run(spec.mount_namespace_argv({"/dev/shm": str(shm)}, [
        sys.executable, "-c", "open('/dev/shm/x', 'w').write('x')"], set(), private_shm=True),
        capture_output=True, text=True, timeout=30)
    assert volume.returncode == 0, volume.stderr
    assert [p.name for p in shm.iterdir()] == ["x"]
