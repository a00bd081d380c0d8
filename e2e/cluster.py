"""The local control plane: `python -m e2e.cluster up | env | down | status`.

Real etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built from the Go module
proxy by e2e/build-binaries.sh), kwok simulating the GPU fleet of a pools file, and one node agent
per `agent: process` node running pods as local processes. Everything listens on loopback; pod
IPs come from 127.x CIDRs.

State (PKI, kubeconfigs, etcd data, logs, pid files) lives in one directory, by default
`<repo>/.e2e-cluster` (override with --state-dir or SLMFLEET_CLUSTER_DIR). Every process started
here carries SLMFLEET_CLUSTER=<state dir> in its environment, so `down` can find and stop all of
them, pod processes included, even if a pid file was lost.

Liveness of a process started by this object is judged by its Popen handle, never by /proc: the
kernel lets Popen return (the close-on-exec pipe closes) before it has set up the new program's
stack, and until then /proc/<pid>/environ reads empty, so the marker is missing from a process
that is alive (bench/environ_race.py measures it). The marker only finds leftovers of earlier runs.

`up` reuses a cluster of the same state dir only if it is complete and healthy; anything else of
that state dir (a half-started or half-stopped cluster, orphans of a run that crashed) is stopped,
with a message naming each process, and the state is removed before a cold start. A port held by
anything else stops `up` before it starts a single process, with the holder named.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from e2e import pools as pools_mod
from e2e.pki import LocalPKI
from images.build import image_ref, read_digests

REPO = Path(__file__).resolve().parent.parent
E2E = REPO / "e2e"
DEFAULT_POOLS = E2E / "pools" / "default.yaml"
MARKER_ENV = "SLMFLEET_CLUSTER"


def service_cidr(network: pools_mod.PodNetwork | int) -> str:
    """The Service CIDR: in loopback, like the pod CIDRs, apart from them (a `podCIDRFirstOctet`'s
    127.<octet - 2>.0.0/16, a `podCIDRRange`'s first /20), so a second cluster with another pod
    network gets its own ClusterIPs too."""
    return pools_mod.pod_network(network).service_cidr


def first_service_ip(network: pools_mod.PodNetwork | int) -> str:
    """The `kubernetes` Service's ClusterIP (the API server's certificate names it)."""
    return pools_mod.pod_network(network).first_service_ip


@functools.cache
def versions() -> dict[str, str]:
    out = {}
    for line in (E2E / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("SLMFLEET_CACHE", Path.home() / ".cache" / "slmfleet"))


def gateway_api_crds() -> Path:
    """The Gateway API standard-channel CRDs (from the sigs.k8s.io/gateway-api module)."""
    return cache_dir() / f"gateway-api-{versions()['GATEWAY_API_VERSION']}"


def binaries() -> dict[str, Path]:
    v = versions()
    kube = cache_dir() / f"kubernetes-{v['KUBE_VERSION']}"
    return {
        "etcd": cache_dir() / f"etcd-{v['ETCD_VERSION']}" / "etcd",
        "kube-apiserver": kube / "kube-apiserver",
        "kube-controller-manager": kube / "kube-controller-manager",
        "kube-scheduler": kube / "kube-scheduler",
        "kwok": cache_dir() / f"kwok-{v['KWOK_VERSION']}" / "kwok",
        "kubectl": kube / "kubectl",
        "crane": cache_dir() / f"crane-{v['CRANE_VERSION']}" / "crane",
        "helm": cache_dir() / f"helm-{v['HELM_VERSION']}" / "helm",
    }


IMAGES_FILE = REPO / "build" / "images.json"


def built_images(path: Path = IMAGES_FILE) -> dict[str, dict]:
    """The images `make images` built (build/images.json, checked by the build's own reader):
    name -> repository, tag, digest, layout. Empty when nothing was built yet."""
    if not path.exists():
        return {}
    return read_digests(path)["images"]


def kubectl_binary() -> str:
    """The kubectl built with the control plane (no version skew), else the one on PATH."""
    built = binaries()["kubectl"]
    return str(built) if built.exists() else "kubectl"


def ephemeral_port_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    try:
        low, high = path.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


@dataclass(frozen=True)
class Ports:
    """All ports derive from one base so a second cluster can run beside the first."""

    base: int

    @property
    def apiserver(self) -> int:
        return self.base

    @property
    def etcd_client(self) -> int:
        return self.base + 1

    @property
    def etcd_peer(self) -> int:
        return self.base + 2

    @property
    def controller_manager(self) -> int:
        return self.base + 3

    @property
    def scheduler(self) -> int:
        return self.base + 4

    @property
    def kwok(self) -> int:
        return self.base + 5

    @property
    def registry(self) -> int:
        return self.base + 6

    def __post_init__(self) -> None:
        # The kernel hands ports of this range to outgoing connections at any moment, so a
        # listener there can lose its port between the free-port check and its own bind.
        low, high = ephemeral_port_range()
        if self.base <= high and self.base + 6 >= low:
            raise ValueError(f"port base {self.base} reaches into the ephemeral port range {low}-{high} "
                             "(net.ipv4.ip_local_port_range): pick a base whose 7 ports lie below or above it")

    def named(self) -> dict[str, int]:
        return {"kube-apiserver": self.apiserver, "etcd client": self.etcd_client, "etcd peer": self.etcd_peer,
                "kube-controller-manager": self.controller_manager, "kube-scheduler": self.scheduler,
                "kwok": self.kwok, "registry": self.registry}


def log(msg: str) -> None:
    print(f"==> [cluster] {msg}", file=sys.stderr, flush=True)


class Cluster:
    def __init__(self, state_dir: Path, port_base: int | None = None):
        self.dir = state_dir.resolve()
        # Default: SLMFLEET_CLUSTER_PORT_BASE, else 16443 (default_port_base).
        self.ports = Ports(default_port_base() if port_base is None else port_base)
        self.pki = LocalPKI(self.dir / "pki")
        self.kubeconfig = self.dir / "kubeconfig"
        self.logs = self.dir / "logs"
        self.pids = self.dir / "pids"
        self.server = f"https://127.0.0.1:{self.ports.apiserver}"
        # The cluster's image registry, the one every pull of a process node reaches (as an
        # air-gapped cluster's mirror); plain HTTP on loopback.
        self.registry = f"127.0.0.1:{self.ports.registry}"
        self._ssl_context: ssl.SSLContext | None = None
        self._procs: dict[str, subprocess.Popen] = {}  # started by this object: judged by the handle
        # How each component was started (argv, env, port): kill() and restart() reuse it.
        self._started: dict[str, tuple[list[str], dict[str, str] | None, int | None]] = {}

    # ---------------------------------------------------------------- processes

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[MARKER_ENV] = str(self.dir)
        env.pop("KUBECONFIG", None)
        return env

    def _running(self, name: str) -> int | None:
        """The pid of component `name` if it is running. One this object started is judged by its
        Popen handle (race-free); one of an earlier run by its pid file and the env marker."""
        proc = self._procs.get(name)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        pid_file = self.pids / f"{name}.pid"
        try:
            pid = int(pid_file.read_text())
        except (ValueError, OSError):
            return None
        # Guard against pid reuse: the process must carry this cluster's marker.
        return pid if _alive(pid) and _has_env(pid, MARKER_ENV, str(self.dir)) else None

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None, port: int | None = None) -> None:
        if port is not None and port_in_use(port):
            raise RuntimeError(f"cannot start {name}: {port_holder_text(port)}")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as logf:
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env or self._env(),
                cwd=REPO,
                start_new_session=True,
            )
        self._procs[name] = proc
        self._started[name] = (list(argv), env, port)
        (self.pids / f"{name}.pid").write_text(str(proc.pid))
        log(f"started {name} (pid {proc.pid}, log {self.logs / (name + '.log')})")

    # ---------------------------------------------------------------- faults (for the fault tests)

    def kill(self, name: str) -> None:
        """SIGKILL component `name` (one this object started: etcd, kube-apiserver, ...), as a crash
        or an OOM kill would, and reap it: its ports are free when this returns."""
        proc = self._procs.get(name)
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"{name} is not running (or was not started by this object)")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log(f"killed {name} (pid {proc.pid})")

    def restart(self, name: str, set_flags: dict[str, str] | None = None, timeout: float = 120) -> None:
        """Starts component `name` again with the argv, env and port it was last started with (same
        data dir, same ports), `set_flags` ({"--watch-cache": "false"}) replacing or adding `--flag=value`
        arguments (kept for later restarts); waits until etcd or kube-apiserver answers healthy."""
        if self._running(name):
            raise RuntimeError(f"{name} is still running: kill() it first")
        argv, env, port = self._started[name]
        if set_flags:
            argv = [a for a in argv if a.split("=", 1)[0] not in set_flags]
            argv += [f"{flag}={value}" for flag, value in set_flags.items()]
        self._start(name, argv, env, port)
        if name == "etcd":
            self._wait("etcd", lambda: _http_ok(f"http://127.0.0.1:{self.ports.etcd_client}/health"), timeout, name)
        elif name == "kube-apiserver":
            self._wait("kube-apiserver /readyz", self.healthy, timeout, name)

    # ---------------------------------------------------------------- config files

    def _kubeconfig(self, path: Path, user: str, cert: Path, key: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "slmfleet-local", "cluster": {"server": self.server, "certificate-authority": str(self.pki.ca.cert)}}
            ],
            "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
            "contexts": [{"name": "slmfleet-local", "context": {"cluster": "slmfleet-local", "user": user}}],
            "current-context": "slmfleet-local",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _prepare(self, network: pools_mod.PodNetwork) -> dict[str, Path]:
        self.dir.mkdir(parents=True, exist_ok=True)
        pki = self.pki
        pki.ensure_ca()
        serving = pki.issue(
            "apiserver",
            "kube-apiserver",
            server_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                          "kubernetes.default.svc.cluster.local"),
            server_ips=("127.0.0.1", first_service_ip(network)),
        )
        sa = pki.service_account_keys()
        admin = pki.issue("admin", "slmfleet-admin", "system:masters")
        kcm = pki.issue("controller-manager", "system:kube-controller-manager")
        sched = pki.issue("scheduler", "system:kube-scheduler")
        # kwok acts for every simulated node at once (status, leases, pod status): it gets admin.
        kwok = pki.issue("kwok", "kwok", "system:masters")
        # The service proxy works out endpoints from Pods (see e2e/service_proxy.py): admin, as kwok.
        proxy = pki.issue("service-proxy", "slmfleet-service-proxy", "system:masters")
        configs = self.dir / "config"
        configs.mkdir(exist_ok=True)
        audit_policy = configs / "audit-policy.yaml"
        # Writes only (reads are noise): later tests count the operator's writes from this log.
        audit_policy.write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                {"level": "None", "verbs": ["get", "list", "watch"]},
                {"level": "None", "resources": [{"group": "coordination.k8s.io", "resources": ["leases"]}]},
                {"level": "Metadata"},
            ],
        }))
        return {
            "serving_cert": serving.cert,
            "serving_key": serving.key,
            "sa_pub": sa.cert,
            "sa_key": sa.key,
            "admin": self._kubeconfig(self.kubeconfig, "admin", admin.cert, admin.key),
            "kcm": self._kubeconfig(configs / "controller-manager.kubeconfig", "kcm", kcm.cert, kcm.key),
            "sched": self._kubeconfig(configs / "scheduler.kubeconfig", "scheduler", sched.cert, sched.key),
            "kwok": self._kubeconfig(configs / "kwok.kubeconfig", "kwok", kwok.cert, kwok.key),
            "proxy": self._kubeconfig(configs / "service-proxy.kubeconfig", "kube-proxy", proxy.cert, proxy.key),
            "audit_policy": audit_policy,
        }

    def user_kubeconfig(self, user: str) -> Path:
        """A kubeconfig for a plain user (no groups): what it may do is only what RBAC grants, as
        for the operator, whose permissions come from deploy/rbac.yaml."""
        pair = self.pki.issue(f"user-{user}", user)
        return self._kubeconfig(self.dir / "config" / f"user-{user}.kubeconfig", user, pair.cert, pair.key)

    def node_kubeconfig(self, node: str) -> Path:
        """A kubelet identity (system:node:<name> in group system:nodes): the Node authorizer
        and NodeRestriction limit the node agent to its own node and its own pods."""
        pair = self.pki.issue(f"node-{node}", f"system:node:{node}", "system:nodes")
        return self._kubeconfig(self.dir / "config" / f"node-{node}.kubeconfig", f"node-{node}", pair.cert, pair.key)

    # ---------------------------------------------------------------- health

    def _ssl(self) -> ssl.SSLContext | None:
        """The admin TLS context, built once the PKI exists (the wait loops poll with it)."""
        if self._ssl_context is None and (self.pki.dir / "admin.key").exists():
            ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
            ctx.load_cert_chain(str(self.pki.dir / "admin.crt"), str(self.pki.dir / "admin.key"))
            self._ssl_context = ctx
        return self._ssl_context

    def _get(self, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
        context = self._ssl()
        if context is None:  # no PKI yet: no cluster here
            return 0, b""
        try:
            with urllib.request.urlopen(self.server + path, context=context, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def _wait(self, what: str, check, timeout: float, log_name: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if log_name and not self._running(log_name):
                proc = self._procs.get(log_name)
                code = f" with status {proc.returncode}" if proc is not None else ""
                tail = (self.logs / f"{log_name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{log_name} exited{code} while waiting for {what}:\n{tail}")
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

    def healthy(self) -> bool:
        return self._get("/readyz")[0] == 200

    # ---------------------------------------------------------------- up

    def complete(self, pools_file: Path) -> bool:
        """A cluster of this state dir that finished `up` with these pools and ports, every one of
        whose processes still runs, and whose API server is ready: one worth reusing."""
        try:
            state = json.loads((self.dir / "cluster.json").read_text())
        except (OSError, ValueError):
            return False
        if state.get("pools") != str(Path(pools_file).resolve()) or state.get("ports") != self.ports.base:
            return False
        names = [f.stem for f in self.pids.glob("*.pid")] if self.pids.exists() else []
        return bool(names) and all(self._running(n) for n in names) and self.healthy()

    def stop_leftovers(self) -> None:
        """Stops every process of an earlier run of this state dir (components, node agents, pods,
        operators, an S3 server started with this marker) and removes the state, saying what went."""
        found = self.our_processes()
        if found:
            log(f"found {len(found)} processes of an earlier run in {self.dir}: "
                + ", ".join(f"{process_name(pid)} (pid {pid})" for pid in found) + "; stopping them")
        if found or self.dir.exists():
            self.down()

    def check_ports_free(self) -> None:
        """Every port of this cluster is free, or an error that names who holds which."""
        held = [f"{what} port {port}: {port_holder_text(port)}"
                for what, port in self.ports.named().items() if port_in_use(port)]
        if held:
            raise RuntimeError(f"cannot start the cluster in {self.dir}:\n  " + "\n  ".join(held))

    def up(self, pools_file: Path, reuse: bool = True) -> None:
        """Starts the cluster cold, or with `reuse` keeps one of this state dir that is complete."""
        t0 = time.monotonic()
        _, network = pools_mod.load_pools_doc(pools_file)
        nodes = pools_mod.load_nodes(pools_file)
        if reuse and self.complete(pools_file):
            log(f"cluster in {self.dir} already up and healthy: reusing it")
            return
        self.stop_leftovers()
        self.check_ports_free()
        self._ensure_binaries()
        bins = binaries()
        files = self._prepare(network)
        p = self.ports

        etcd_url = f"http://127.0.0.1:{p.etcd_client}"
        self._start("etcd", [
            str(bins["etcd"]),
            "--name=slmfleet",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{p.etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{p.etcd_peer}",
            f"--initial-cluster=slmfleet=http://127.0.0.1:{p.etcd_peer}",
            "--listen-metrics-urls=",
            # A throwaway test cluster: durability is not worth an fsync per write on a shared disk.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ], port=p.etcd_client)
        self._wait("etcd", lambda: _http_ok(f"{etcd_url}/health"), 60, "etcd")

        self._start("kube-apiserver", [
            str(bins["kube-apiserver"]),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={p.apiserver}",
            f"--tls-cert-file={files['serving_cert']}",
            f"--tls-private-key-file={files['serving_key']}",
            f"--client-ca-file={self.pki.ca.cert}",
            "--authorization-mode=Node,RBAC",
            # Reach kubelets (logs, exec) by their InternalIP 127.0.0.1, never by resolving a node's
            # name in DNS, which would ask a resolver off this machine.
            "--kubelet-preferred-address-types=InternalIP",
            # PodSecurity is on by default; NodeRestriction confines each node agent to its node.
            "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={service_cidr(network)}",
            "--service-node-port-range=30000-32767",
            f"--service-account-key-file={files['sa_pub']}",
            f"--service-account-signing-key-file={files['sa_key']}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--allow-privileged=true",
            "--profiling=false",
            f"--audit-policy-file={files['audit_policy']}",
            f"--audit-log-path={self.dir / 'audit.log'}",
            "--audit-log-maxsize=200",
            "--audit-log-maxbackup=1",
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            "--v=0",
        ], port=p.apiserver)
        self._wait("kube-apiserver /readyz", self.healthy, 120, "kube-apiserver")

        self._start("kube-controller-manager", [
            str(bins["kube-controller-manager"]),
            f"--kubeconfig={files['kcm']}",
            f"--authentication-kubeconfig={files['kcm']}",
            f"--authorization-kubeconfig={files['kcm']}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p.controller_manager}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={files['sa_key']}",
            f"--root-ca-file={self.pki.ca.cert}",
            f"--cluster-signing-cert-file={self.pki.ca.cert}",
            f"--cluster-signing-key-file={self.pki.ca.key}",
            f"--service-cluster-ip-range={service_cidr(network)}",
            # Pod CIDRs are set on the Node objects by this tool (127.x); no IPAM needed.
            "--allocate-node-cidrs=false",
            "--controllers=*,-node-ipam-controller",
            # A claim created with its volume is bound on the next sync when the controller has not
            # seen the volume yet: every 15 s by default, which made each e2e test with a claim wait.
            "--pvclaimbinder-sync-period=1s",
            "--v=0",
        ])
        self._start("kube-scheduler", [
            str(bins["kube-scheduler"]),
            f"--kubeconfig={files['sched']}",
            f"--authentication-kubeconfig={files['sched']}",
            f"--authorization-kubeconfig={files['sched']}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p.scheduler}",
            "--leader-elect=false",
            "--v=0",
        ])
        self._start("kwok", [
            str(bins["kwok"]),
            f"--kubeconfig={files['kwok']}",
            f"--manage-nodes-with-label-selector={pools_mod.AGENT_LABEL}=kwok",
            # Fallback pool for a node without a podCIDR; every node here has one.
            f"--cidr={network.fallback_cidr}",
            "--node-ip=127.0.0.1",
            f"--server-address=127.0.0.1:{p.kwok}",
            "--node-lease-duration-seconds=40",
        ])

        (self.dir / "registry").mkdir(exist_ok=True)  # crane's --disk store must exist
        self._start("registry", [
            str(bins["crane"]), "registry", "serve", f"--address={self.registry}", f"--disk={self.dir / 'registry'}",
        ], port=p.registry)
        self._wait("the image registry", lambda: _http_ok(f"http://{self.registry}/v2/"), 30, "registry")
        self.push_images()

        self._start("service-proxy", [
            sys.executable, "-m", "e2e.service_proxy", f"--kubeconfig={files['proxy']}",
            f"--service-cidr={service_cidr(network)}",
        ])
        self._register_nodes(nodes)
        # The Gateway API CRDs (no gateway implementation): HTTPRoute weights can be verified as objects.
        self._kubectl("apply", "--server-side", "-f", str(gateway_api_crds()))
        for node in nodes:
            if node.agent == "process":
                self._start(f"node-agent-{node.name}", [
                    sys.executable, "-m", "e2e.node_agent",
                    f"--node={node.name}",
                    f"--kubeconfig={self.node_kubeconfig(node.name)}",
                    f"--state-dir={self.dir / 'nodes' / node.name}",
                    f"--pod-cidr={node.pod_cidr}",
                    f"--registry={self.registry}",
                ])

        self._wait("all nodes Ready", lambda: self._nodes_ready({n.name for n in nodes}), 120)
        self._wait("the default ServiceAccount", lambda: self._get(
            "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200, 60, "kube-controller-manager")
        (self.dir / "cluster.json").write_text(json.dumps({
            "server": self.server, "ports": self.ports.base, "pools": str(Path(pools_file).resolve()),
            "nodes": [n.name for n in nodes],
        }))
        log(f"cluster up with {len(nodes)} nodes in {time.monotonic() - t0:.1f}s")

    def image_ref(self, name: str, images: dict[str, dict] | None = None) -> str:
        """`registry/repository:tag@digest` of built image `name` (slmfleet, vllm-standin) on this
        cluster's registry."""
        image = (images if images is not None else built_images())[name]
        return f"{self.registry}/{image_ref(image)}"

    def push_images(self, images: dict[str, dict] | None = None) -> None:
        """Pushes the images `make images` built to the registry, by digest (crane keeps digests)."""
        images = built_images() if images is None else images
        if not images:
            log(f"no images in {IMAGES_FILE} (run `make images`): pods of slmfleet's images will fail to pull")
            return
        crane = str(binaries()["crane"])
        for name, image in sorted(images.items()):
            ref = f"{self.registry}/{image['repository']}:{image['tag']}"
            out = subprocess.run([crane, "push", image["layout"], ref], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"crane push {image['layout']} {ref} failed: {out.stderr.strip()[-2000:]}")
            pushed = out.stdout.strip()
            if not pushed.endswith("@" + image["digest"]):
                raise RuntimeError(f"pushing {image['layout']} gave {pushed}, not the built digest {image['digest']}")
            log(f"pushed {name} to {ref}@{image['digest']}")

    def _ensure_binaries(self) -> None:
        script = E2E / "build-binaries.sh"
        if subprocess.run([str(script), "--check"]).returncode == 0:
            return
        log("control-plane binaries missing: building them (cold build, logs below)")
        subprocess.run([str(script)], check=True)

    def _kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [kubectl_binary(), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, text=True, capture_output=True, check=check,
        )

    def _register_nodes(self, nodes: list[pools_mod.NodeSpec]) -> None:
        status, body = self._get("/api/v1/nodes")
        existing = {item["metadata"]["name"] for item in json.loads(body)["items"]} if status == 200 else set()
        missing = [n for n in nodes if n.name not in existing]
        if missing:
            manifest = {"apiVersion": "v1", "kind": "List",
                        "items": [pools_mod.node_manifest(n) for n in missing]}
            self._kubectl("create", "-f", "-", input=json.dumps(manifest))
            log(f"registered {len(missing)} nodes ({len(existing)} already present)")

    def _nodes_ready(self, names: set[str]) -> bool:
        status, body = self._get("/api/v1/nodes")
        if status != 200:
            return False
        ready = set()
        for item in json.loads(body)["items"]:
            for cond in item.get("status", {}).get("conditions") or []:
                if cond["type"] == "Ready" and cond["status"] == "True":
                    ready.add(item["metadata"]["name"])
        return names <= ready

    # ---------------------------------------------------------------- down

    def our_processes(self) -> list[int]:
        """Every live process that carries this cluster's marker (components, agents, pods)."""
        return [pid for pid in processes_with_env(MARKER_ENV, str(self.dir)) if pid != os.getpid()]

    def down(self) -> None:
        # Reverse start order: node agents first (they stop their pods' processes themselves),
        # then kwok and the controllers, the API server, and etcd last.
        rank = {"kwok": 1, "service-proxy": 1, "kube-scheduler": 2, "kube-controller-manager": 2, "kube-apiserver": 3, "etcd": 4,
                "registry": 5}
        order = sorted(self.pids.glob("*.pid"), key=lambda f: (rank.get(f.stem, 0), f.stem)) \
            if self.pids.exists() else []
        for pid_file in order:
            pid = self._running(pid_file.stem)
            if pid:
                t0 = time.monotonic()
                _terminate([pid], grace=10)
                log(f"stopped {pid_file.stem} (pid {pid}) in {time.monotonic() - t0:.1f}s")
        for proc in self._procs.values():  # reap our own children
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        leftovers = self.our_processes()
        if leftovers:
            log(f"stopping {len(leftovers)} leftover processes: "
                + ", ".join(f"{process_name(pid)} (pid {pid})" for pid in leftovers))
            _terminate(leftovers, grace=5)
        remaining = self.our_processes()
        if remaining:
            raise RuntimeError(f"processes still running after down: {remaining}")
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self._ssl_context = None
        log("cluster down; state removed")


def _terminate(pids: list[int], grace: float) -> None:
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGTERM)
                break
            except (ProcessLookupError, PermissionError):
                continue
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running, or still exiting. A killed multi-threaded process (every Go binary here) shows its
    leader as a zombie while the other threads are still exiting, and its sockets stay open until the
    last one is gone: it is dead only when the zombie leader is its last task."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def _has_env(pid: int, key: str, value: str) -> bool:
    return env_value(pid, key) == value


def processes_with_env(key: str, value: str) -> list[int]:
    """Live (not zombie) processes whose environment has key=value."""
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and _has_env(int(e.name), key, value) and _alive(int(e.name))]


def env_value(pid: int, key: str) -> str | None:
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{key}=".encode()
    return next((e[len(prefix):].decode(errors="replace") for e in entries if e.startswith(prefix)), None)


def process_name(pid: int) -> str:
    """A short name for a process: `etcd`, `python -m e2e.node_agent`, `slmfleet operator run`."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "(exited)"
    if not argv:
        return "(no command line)"
    if os.path.basename(argv[0]).startswith("python") and len(argv) > 1:
        if argv[1] == "-m" and len(argv) > 2:
            argv = ["python -m " + argv[2], *argv[3:]]
        elif not argv[1].startswith("-"):
            argv = argv[1:]  # a script: its own name says more than the interpreter's
    words = [a for a in argv[1:] if a[:1] not in ("-", "") and "/" not in a and len(a.split()) == 1][:2]
    return " ".join([os.path.basename(argv[0]), *words])


def port_holder(port: int) -> int | None:
    """The pid of the process listening on `port` (any local address), if this user can see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None


def port_holder_text(port: int, others: str = "or pick other ports with --port-base or SLMFLEET_CLUSTER_PORT_BASE") -> str:
    """Who holds 127.0.0.1:`port`, and what to do about it (`others`: how to use another port)."""
    pid = port_holder(port)
    if pid is None:
        return f"127.0.0.1:{port} is already in use by a process this user cannot see; {others}"
    marker = env_value(pid, MARKER_ENV)
    if marker:
        return (f"127.0.0.1:{port} is held by {process_name(pid)} (pid {pid}) of the local cluster in {marker}: "
                f"stop it with `python -m e2e.cluster down --state-dir {marker}`, {others}")
    return f"127.0.0.1:{port} is held by {process_name(pid)} (pid {pid}), which is not part of a local cluster; {others}"


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# Every HTTP request of the e2e code goes to a loopback address: never through an HTTP(S)_PROXY
# the environment may name, which would send it off this machine.
_LOOPBACK_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def urlopen(url: str | urllib.request.Request, timeout: float):
    """urllib's urlopen without proxies (see _LOOPBACK_OPENER)."""
    return _LOOPBACK_OPENER.open(url, timeout=timeout)


def _http_ok(url: str) -> bool:
    try:
        with urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def default_state_dir() -> Path:
    return Path(os.environ.get("SLMFLEET_CLUSTER_DIR", REPO / ".e2e-cluster"))


def default_port_base() -> int:
    return int(os.environ.get("SLMFLEET_CLUSTER_PORT_BASE", 16443))


def default_pools() -> Path:
    """The pools file (SLMFLEET_CLUSTER_POOLS): a second cluster beside the first gives its own, with
    another podCIDRRange (or podCIDRFirstOctet), so that the pod IPs of the two differ."""
    return Path(os.environ.get("SLMFLEET_CLUSTER_POOLS", DEFAULT_POOLS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "env", "down", "status"])
    parser.add_argument("--pools", type=Path, default=default_pools(), help="pools file (default: %(default)s)")
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    parser.add_argument("--port-base", type=int, default=default_port_base(),
                        help="kube-apiserver port; etcd, the others and the registry take the next six")
    args = parser.parse_args(argv)
    cluster = Cluster(args.state_dir, args.port_base)
    if args.command == "up":
        try:
            cluster.up(args.pools)
        except (RuntimeError, TimeoutError, pools_mod.PoolsError, subprocess.CalledProcessError) as exc:
            print(f"cluster up failed: {exc}", file=sys.stderr)
            return 1
        print(f"export KUBECONFIG={cluster.kubeconfig}")
    elif args.command == "env":
        if not cluster.kubeconfig.exists():
            print("no cluster: run `python -m e2e.cluster up` first", file=sys.stderr)
            return 1
        print(f"export KUBECONFIG={cluster.kubeconfig}")
    elif args.command == "status":
        ok = cluster.healthy()
        print("up" if ok else "down")
        return 0 if ok else 1
    else:
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
