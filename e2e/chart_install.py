"""Installing slmfleet the way a platform team does, on the local cluster: the chart and the images
come from a registry (the cluster's loopback registry plays the air-gapped mirror), `helm install`
puts the operator in-cluster on the chart's ServiceAccount and RBAC, on a process node so that it
really runs.

Used by `make demo`, `make airgap` (e2e/airgap.py) and the air-gapped e2e test.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from e2e.cluster import IMAGES_FILE, REPO, Cluster, binaries, built_images, urlopen

RELEASE = "slmfleet"
NAMESPACE = "slmfleet-system"
PULL_SECRET = "slmfleet-mirror"
CHART_NAME = "slmfleet"
AIRGAP_VALUES = REPO / "charts" / "slmfleet" / "ci" / "airgap-values.yaml"
PROCESS_NODE = {"slmfleet.io/node-agent": "process"}


def chart_version() -> str:
    return yaml.safe_load((REPO / "charts" / "slmfleet" / "Chart.yaml").read_text())["version"]


class Helm:
    """helm (built from the Go module proxy) against one cluster, with its own config and cache
    directories in the cluster's state dir: nothing of the user's ~/.config/helm is read or written."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        home = cluster.dir / "helm"
        self.env = {**os.environ, "HELM_CONFIG_HOME": str(home / "config"), "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_DATA_HOME": str(home / "data"), "KUBECONFIG": str(cluster.kubeconfig)}

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        out = subprocess.run([str(binaries()["helm"]), *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return out


def package_chart(out_dir: Path, images_file: Path = IMAGES_FILE) -> Path:
    """`make chart`: build/charts/slmfleet-<version>.tgz with the built operator image's digest."""
    subprocess.run([sys.executable, str(REPO / "charts" / "package.py"), "--images", str(images_file),
                    "--out", str(out_dir), "--helm", str(binaries()["helm"])], check=True, capture_output=True, text=True)
    return out_dir / f"{CHART_NAME}-{chart_version()}.tgz"


def push_chart(cluster: Cluster, package: Path) -> str:
    """`helm push` to oci://<registry>/charts; returns the chart's OCI reference (without version)."""
    out = Helm(cluster).run("push", str(package), f"oci://{cluster.registry}/charts", "--plain-http")
    digest = next((line.split()[-1] for line in (out.stdout + out.stderr).splitlines() if line.startswith("Digest:")), "")
    print(f"    pushed chart {package.name} to oci://{cluster.registry}/charts/{CHART_NAME} ({digest})", flush=True)
    return f"oci://{cluster.registry}/charts/{CHART_NAME}"


def pull_secret(cluster: Cluster, namespace: str) -> dict:
    """A docker-registry Secret for the cluster's registry. The registry is open; the node agent
    reads the Secret for every pull as a kubelet would, which shows it reached the pod."""
    auth = base64.b64encode(b"mirror-reader:mirror-password").decode()
    config = {"auths": {cluster.registry: {"auth": auth}}}
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": PULL_SECRET, "namespace": namespace},
            "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()}}


def apply(cluster: Cluster, *objects: dict) -> None:
    cluster._kubectl("apply", "--server-side", "-f", "-",
                     input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def prepare_namespace(cluster: Cluster, namespace: str) -> None:
    """A namespace (Pod Security `restricted` enforced) with the mirror's pull secret."""
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}},
          pull_secret(cluster, namespace))


def values_file(cluster: Cluster, path: Path, *, operator_digest: str | None = None, vllm_digest: str | None = None,
                images: dict[str, dict] | None = None) -> Path:
    """The air-gapped values (charts/slmfleet/ci/airgap-values.yaml) for this cluster: its registry,
    the built images' digests (from build/images.json, never typed), the operator on a process node."""
    images = images if images is not None else built_images()
    values = yaml.safe_load(AIRGAP_VALUES.read_text())
    values["imageRegistry"] = cluster.registry
    values["image"]["digest"] = operator_digest or images["slmfleet"]["digest"]
    values["vllm"]["image"]["digest"] = vllm_digest or images["vllm-standin"]["digest"]
    if "vllm-cpu" in images:
        values["vllm"]["cpuImage"]["digest"] = images["vllm-cpu"]["digest"]
    values["nodeSelector"] = dict(PROCESS_NODE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


@dataclass
class OperatorPod:
    name: str
    ip: str
    image: str
    image_id: str
    uid: str

    @property
    def url(self) -> str:
        return f"http://{self.ip}:8080"


def operator_pods(cluster: Cluster) -> list[dict]:
    out = cluster._kubectl("get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=operator", "-o", "json")
    return [p for p in json.loads(out.stdout)["items"] if not p["metadata"].get("deletionTimestamp")]


def wait_operator(cluster: Cluster, timeout: float = 120, image: str | None = None) -> OperatorPod:
    """Until one operator pod (of `image`, if given) is Ready; fails with the pods' states."""
    deadline = time.monotonic() + timeout
    pods: list[dict] = []
    while time.monotonic() < deadline:
        pods = operator_pods(cluster)
        for pod in pods:
            statuses = pod.get("status", {}).get("containerStatuses") or []
            if statuses and statuses[0].get("ready") and (image is None or statuses[0]["image"] == image):
                return OperatorPod(pod["metadata"]["name"], pod["status"]["podIP"], statuses[0]["image"],
                                   statuses[0].get("imageID", ""), pod["metadata"]["uid"])
        time.sleep(0.5)
    states = {p["metadata"]["name"]: [c.get("state") for c in p.get("status", {}).get("containerStatuses") or []]
              for p in pods}
    raise TimeoutError(f"no Ready operator pod after {timeout:.0f}s: {states}")


def container_log(cluster: Cluster, namespace: str, pod: str) -> str:
    """What a pod's containers printed, from the node agent's files (a process node serves no
    kubelet API for `kubectl logs`)."""
    obj = json.loads(cluster._kubectl("get", "pod", "-n", namespace, pod, "-o", "json").stdout)
    pod_dir = cluster.dir / "nodes" / obj["spec"]["nodeName"] / "pods" / obj["metadata"]["uid"] / "containers"
    return "\n".join(f"--- {f.parent.name}\n{f.read_text(errors='replace')[-4000:]}"
                     for f in sorted(pod_dir.glob("*/output.log")))


def healthz(url: str) -> int:
    try:
        with urlopen(f"{url}/healthz", timeout=3) as resp:
            return resp.status
    except OSError:
        return 0


def installed(cluster: Cluster) -> OperatorPod | None:
    """The chart's operator, if a release is installed and its pod is Ready."""
    if Helm(cluster).run("status", RELEASE, "-n", NAMESPACE, check=False).returncode != 0:
        return None
    try:
        return wait_operator(cluster, timeout=1)
    except TimeoutError:
        return None
