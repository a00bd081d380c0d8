"""Run the real operator (`slmfleet operator run`) against the local cluster, as its own user.

The operator authenticates as the plain user `slmfleet-operator`, so it can do only what
deploy/rbac.yaml grants, exactly as the ServiceAccount in a real installation. It carries the
cluster's env marker, so `python -m e2e.cluster down` stops it with everything else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from e2e.cluster import (
    MARKER_ENV,
    REPO,
    Cluster,
    _alive,
    _has_env,
    _terminate,
    port_holder_text,
    port_in_use,
    urlopen,
)

OPERATOR_USER = "slmfleet-operator"
OPERATOR_NAMESPACE = "slmfleet-system"
CONFIG = REPO / "e2e" / "operator-config.yaml"


# build/images.json's name of the vLLM-CPU test image (images/build.py: slmfleet/vllm-cpu-test). Its
# pods run the REAL vLLM on the CPU process nodes (e2e/node_agent/images.py); the GPU path keeps the
# stand-in's image ("vllm-standin").
CPU_VLLM_IMAGE = "vllm-cpu"


def cpu_vllm_image(cluster: Cluster) -> str:
    """The vLLM-CPU test image as pushed to `cluster`'s registry, pinned by its built digest: what
    the operator's config takes as `cpuVllmImage`."""
    return cluster.image_ref(CPU_VLLM_IMAGE)


def local_config(template: str, vllm_image: str, loader_image: str, overrides: dict | None = None,
                 cpu_vllm_image: str | None = None) -> str:
    """CONFIG's text with the image references added (`cpuVllmImage` only when given), and
    `overrides` (top-level keys of the config file, e.g. {"workerStallSeconds": 10}) in place of
    the template's."""
    config = yaml.safe_load(template)
    config["vllmImage"] = vllm_image
    config["loaderImage"] = loader_image
    if cpu_vllm_image is not None:
        config["cpuVllmImage"] = cpu_vllm_image
    config.update(overrides or {})
    return yaml.safe_dump(config, sort_keys=False)


def write_config(cluster: Cluster, overrides: dict | None = None) -> Path:
    """The operator's config for this cluster: CONFIG with the images `make images` built, as
    pushed to the cluster's registry (the vLLM stand-in's test image for GPU placements, the image
    the node agent runs the real vLLM-CPU for on CPU placements), and `overrides`."""
    path = cluster.dir / "operator-config.yaml"
    path.write_text(local_config(CONFIG.read_text(), cluster.image_ref("vllm-standin"), cluster.image_ref("slmfleet"),
                                 overrides, cpu_vllm_image=cpu_vllm_image(cluster)))
    return path


def install(cluster: Cluster) -> None:
    """CRDs and RBAC; idempotent. Waits until the CRDs are established."""
    # The operator's namespace: its leader-election Lease (operator-config.yaml) and the Role for it.
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}}
    cluster._kubectl("apply", "--server-side", "-f", "-", input=json.dumps(namespace))
    cluster._kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        str(REPO / "crds"),
        "-f",
        str(REPO / "deploy" / "rbac.yaml"),
    )
    cluster._kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/smallmodels.slmfleet.io",
        "crd/modelrollouts.slmfleet.io",
    )


class OperatorProcess:
    def __init__(self, cluster: Cluster, *, metrics_port: int, pending_timeout: int | None = None,
                 namespaces: tuple[str, ...] = (), config_overrides: dict | None = None,
                 server: str | None = None) -> None:
        self.cluster = cluster
        self.server = server  # the API server URL its kubeconfig names (None: the cluster's; or a fault proxy's)
        self.metrics_port = metrics_port
        self.pending_timeout = pending_timeout
        self.namespaces = namespaces
        self.config_overrides = config_overrides  # top-level keys of the config file (write_config)
        self.log_path = cluster.dir / "logs" / f"operator-{metrics_port}.log"
        self.proc: subprocess.Popen | None = None

    # False for a second replica (leader election): it leaves the recorded operator running and the
    # record (operator.json) to it.
    stops_others = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @staticmethod
    def state_file(cluster: Cluster) -> Path:
        return cluster.dir / "operator.json"

    @classmethod
    def running(cls, cluster: Cluster) -> OperatorProcess | None:
        """The operator started for this cluster by anyone (demo or tests), if it is healthy."""
        try:
            state = json.loads(cls.state_file(cluster).read_text())
        except (OSError, ValueError):
            return None
        op = cls(cluster, metrics_port=state["port"])
        return op if op.healthy() else None

    def _stop_recorded(self) -> None:
        """One operator per cluster: two would reconcile the same models against each other."""
        try:
            pid = json.loads(self.state_file(self.cluster).read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return
        if self.proc is not None and self.proc.pid == pid:
            self.stop()  # ours: judged by the handle, not by /proc
        elif _alive(pid) and _has_env(pid, MARKER_ENV, str(self.cluster.dir)):
            _terminate([pid], grace=20)

    def start(self, timeout: float = 60) -> OperatorProcess:
        install(self.cluster)
        if self.stops_others:
            self._stop_recorded()
        if port_in_use(self.metrics_port):
            raise RuntimeError(f"cannot start the operator: "
                               f"{port_holder_text(self.metrics_port, 'or give it another metrics port')}")
        kubeconfig = self.cluster.user_kubeconfig(OPERATOR_USER)
        if self.server is not None:
            doc = yaml.safe_load(kubeconfig.read_text())
            doc["clusters"][0]["cluster"]["server"] = self.server
            kubeconfig = kubeconfig.with_name(f"operator-{self.metrics_port}.kubeconfig")
            kubeconfig.write_text(yaml.safe_dump(doc))
            kubeconfig.chmod(0o600)
        args = [
            str(Path(sys.executable).parent / "slmfleet"), "operator", "run",
            "--config", str(write_config(self.cluster, self.config_overrides)), "--kubeconfig", str(kubeconfig),
            "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port),
        ]
        if self.pending_timeout is not None:
            args += ["--pending-timeout", str(self.pending_timeout)]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        env = {**os.environ, MARKER_ENV: str(self.cluster.dir), "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if self.stops_others:
            self.state_file(self.cluster).write_text(json.dumps({"pid": self.proc.pid, "port": self.metrics_port}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}; see {self.log_path}")
            if self.healthy():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"operator not healthy after {timeout}s; see {self.log_path}")

    def healthy(self) -> bool:
        try:
            with urlopen(f"{self.url}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        return metrics(self.url)

    def reconciles(self) -> float:
        return reconciles(self.url)

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None:
            self._stop_recorded()
            return
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a node failure or an OOM kill would: nothing gets to finish."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def metrics(url: str) -> dict[str, float]:
    """Samples of an operator's /metrics as {'name{labels}': value}."""
    with urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def reconciles(url: str) -> float:
    """How many reconciles the operator at `url` has finished, whatever their outcome."""
    return sum(v for k, v in metrics(url).items() if k.startswith("slmfleet_reconciles_total"))


def audit_writes(cluster: Cluster, user: str | None = OPERATOR_USER, since_line: int = 0) -> tuple[int, list[dict]]:
    """(lines in the audit log, write entries made by `user` (None: by anyone) after line `since_line`)."""
    path = cluster.dir / "audit.log"
    lines = path.read_text().splitlines() if path.exists() else []
    entries = []
    for line in lines[since_line:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if user in (None, entry.get("user", {}).get("username")) and entry.get("stage") == "ResponseComplete":
            entries.append(entry)
    return len(lines), entries
