"""`make demo`: the local cluster, the operator, and example SmallModels sized to the fleet.

Starts the control plane and the simulated GPU fleet with its loopback registry (the images
`make images` built are pushed to it), installs the operator the way a user would: `helm install`
of the packaged chart from that registry, the operator in-cluster on a process node. Then applies
examples/smallmodels/, waits for every model to settle, prints the placements, and sends the
really-served models a chat completion at their pod IPs: the 0.5B one answered by the stand-in on a
simulated L4, SmolLM2-135M by the real vLLM on a CPU node. Then rolls SmolLM2 out twice under
examples/modelrollouts/, decided on the real vLLM's answers: to its float32 copy (promoted), then to
a perturbed copy (rolled back). The cluster and the operator keep running afterwards. An operator
already running for this cluster (a chart release, or the e2e tests' `slmfleet operator run`
process) is reused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from e2e import chart_install
from e2e.cluster import DEFAULT_POOLS, REPO, Cluster, binaries, default_state_dir, kubectl_binary, urlopen, versions
from e2e.operator_proc import OperatorProcess

NAMESPACE = "slmfleet-demo"
EXAMPLES = REPO / "examples" / "smallmodels"
ROLLOUTS = REPO / "examples" / "modelrollouts"
SERVED = "qwen2-5-0-5b"
CPU_MODEL = "smollm2-135m-cpu"  # examples/smallmodels/60-smollm2-135m-cpu.yaml: the real vLLM on CPU
ROLLOUT_TIMEOUT = 420  # a candidate on the real vLLM starts in a minute or two, then answers 24 cases


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def weights_volume() -> str:
    """PersistentVolumes on examples/weights and on the SmolLM2 weights' cache, and their claims
    (hostPath volumes are not allowed under Pod Security restricted, but a claim bound to one is)."""
    from e2e.real_vllm import install

    items = []
    for claim, path in (("demo-weights", REPO / "examples" / "weights"), ("demo-cpu-weights", install.cache_root() / "models")):
        volume = f"slmfleet-{claim}"
        items += [
            {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
             "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                      "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(path)},
                      "claimRef": {"namespace": NAMESPACE, "name": claim}}},
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": NAMESPACE},
             "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": volume,
                      "resources": {"requests": {"storage": "1Gi"}}}},
        ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def settled(obj: dict) -> bool:
    """Serving, or told that it cannot be placed (the example meant to fit nowhere)."""
    ready, degraded = condition(obj, "Ready"), condition(obj, "Degraded")
    current = ready.get("observedGeneration") == obj["metadata"]["generation"]
    return current and (ready.get("status") == "True" or degraded.get("reason") == "NoFit")


def table(models: list[dict]) -> str:
    rows = [("MODEL", "PLACEMENT", "GPU x COUNT", "TP", "UTIL", "MAX CONTEXT", "READY")]
    for m in models:
        p = m.get("status", {}).get("placement") or {}
        ready = condition(m, "Ready")
        status = m.get("status", {})
        rows.append((
            m["metadata"]["name"],
            p.get("gpuResource", "-"),
            p.get("summary", "-"),
            str(p.get("tensorParallelSize", "-")),
            p.get("gpuMemoryUtilization", "-"),
            str(p.get("maxModelLen", "-")),
            f"{status.get('readyReplicas', 0)}/{status.get('replicas', 0)}" if ready.get("status") == "True"
            else condition(m, "Degraded").get("reason") or ready.get("reason", "-"),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("    " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def roll_out(kubectl, model: str, weights: Path, claim: str, expected: str, torch_dtype: str) -> int:
    """Point `model` at the pinned weights in `weights` (on the claim `claim`, stored in `torch_dtype`)
    and follow its rollout (examples/modelrollouts/) to the end; 0 if it ended as `expected`."""
    from slmfleet.weights.manifest import Manifest  # the digest as `slmfleet pin` computes it

    digest = Manifest.parse((weights / "slmfleet-manifest.json").read_text()).digest
    step(f"Rolling {model} out to {weights.name}, gated on an evaluation against the serving revision")
    before = json.loads(kubectl("get", "mr", model, "-n", NAMESPACE, "-o", "json")).get("status") or {}
    patch = {"spec": {"source": {"uri": f"pvc://{claim}/{weights.name}", "digest": digest},
                      "architecture": {"torchDtype": torch_dtype}}}
    print(kubectl("patch", "sm", model, "-n", NAMESPACE, "--type=merge", "-p", json.dumps(patch)), end="")
    deadline = time.monotonic() + ROLLOUT_TIMEOUT
    last = None
    while True:
        status = json.loads(kubectl("get", "mr", model, "-n", NAMESPACE, "-o", "json")).get("status") or {}
        served = json.loads(kubectl("get", "sm", model, "-n", NAMESPACE, "-o", "json")).get("status") or {}
        now = (status.get("phase"), status.get("currentStep"), status.get("canaryWeight"))
        fresh = (status.get("candidateRevision") == served.get("revision")
                 and status.get("candidateRevision") != before.get("candidateRevision"))
        if fresh and now != last:
            print(f"    {status.get('phase'):<11} step {status.get('currentStep')}  canary {status.get('canaryWeight')}%"
                  f"  {status.get('message', '')[:110]}", flush=True)
            last = now
        if fresh and status.get("phase") in ("Promoted", "RolledBack", "Failed"):
            break
        if time.monotonic() > deadline:
            print(f"the rollout did not finish within {ROLLOUT_TIMEOUT}s; see `kubectl describe mr -n {NAMESPACE} "
                  f"{model}`", file=sys.stderr)
            return 1
        time.sleep(0.5)
    result = status.get("evaluations", [])[-1]
    print(f"    evaluation at step {result['step']}: stable {result['stableScore']}, candidate "
          f"{result['candidateScore']} on {result['n']} cases, difference {result['difference']} "
          f"[{result['ciLow']}, {result['ciHigh']}]: {result['verdict']}")
    print(f"    {model}: rollout {status['phase']}, serving revision {served.get('servingRevision')}")
    return 0 if status["phase"] == expected else 1


def install_operator(cluster: Cluster) -> str:
    """The operator's URL: a running one reused, else the chart installed from the registry."""
    running = OperatorProcess.running(cluster)
    if running is not None:
        step("Reusing the operator already running for this cluster")
        print(f"    reusing the running operator ({running.url})")
        return running.url
    release = chart_install.installed(cluster)
    if release is not None:
        step(f"Reusing the installed chart (release {chart_install.RELEASE} in {chart_install.NAMESPACE})")
        print(f"    reusing the running operator ({release.url}, pod {release.name})")
        return release.url
    step("Installing the operator from the local registry: helm install oci://… with the air-gapped values")
    for name in sorted(chart_install.built_images()):
        print(f"    image {cluster.image_ref(name)}")
    package = chart_install.package_chart(cluster.dir / "charts")
    chart = chart_install.push_chart(cluster, package)
    chart_install.prepare_namespace(cluster, chart_install.NAMESPACE)
    values = chart_install.values_file(cluster, cluster.dir / "demo-values.yaml")
    chart_install.Helm(cluster).run("install", chart_install.RELEASE, chart, "--version", chart_install.chart_version(),
                                    "--plain-http", "-n", chart_install.NAMESPACE, "-f", str(values))
    pod = chart_install.wait_operator(cluster, timeout=180)
    print(f"    helm install {chart_install.RELEASE} {chart} -n {chart_install.NAMESPACE} -f {values}")
    print(f"    operator pod {pod.name} Ready at {pod.ip} ({pod.image_id})")
    return pod.url


def main() -> int:
    cluster = Cluster(default_state_dir())
    step("Starting the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok, node agents)")
    t0 = time.monotonic()
    cluster.up(DEFAULT_POOLS)
    cluster.push_images()  # a reused cluster gets the images built since it started
    print(f"    up in {time.monotonic() - t0:.1f}s")

    def kubectl(*args: str, check: bool = True, input: str | None = None) -> str:
        out = subprocess.run([kubectl_binary(), f"--kubeconfig={cluster.kubeconfig}", *args],
                             capture_output=True, text=True, input=input)
        if check and out.returncode:
            raise SystemExit(out.stderr)
        return out.stdout

    step("The simulated GPU fleet (labels as NVIDIA GPU Feature Discovery sets them)")
    print(
        kubectl(
            "get",
            "nodes",
            "-L",
            "nvidia.com/gpu.product,nvidia.com/gpu.count,nvidia.com/mig.strategy,slmfleet.io/node-agent",
        )
    )

    operator_url = install_operator(cluster)

    step("Applying examples/smallmodels/")
    print(kubectl("apply", "-f", str(EXAMPLES / "00-namespace.yaml")), end="")
    # The chart passes its pull secret on to every model pod; each namespace needs its copy.
    chart_install.apply(cluster, chart_install.pull_secret(cluster, NAMESPACE))
    print(kubectl("apply", "-f", "-", input=weights_volume()), end="")
    kubectl("wait", "-n", NAMESPACE, "--for=jsonpath={.status.phase}=Bound", "pvc/demo-weights", "pvc/demo-cpu-weights",
            "--timeout=60s")
    print(kubectl("apply", "-f", str(EXAMPLES)))

    # The real vLLM on CPU takes a minute or two to load and warm up on this machine.
    deadline = time.monotonic() + 420
    while True:
        models = json.loads(kubectl("get", "sm", "-n", NAMESPACE, "-o", "json"))["items"]
        if models and all(settled(m) for m in models):
            break
        if time.monotonic() > deadline:
            print(table(models))
            print("models did not settle within 420s; see `kubectl describe sm -n slmfleet-demo`", file=sys.stderr)
            return 1
        time.sleep(1)

    step("Where the operator put each model")
    print(table(sorted(models, key=lambda m: m["metadata"]["name"])))
    print()
    print(kubectl("get", "sm", "-n", NAMESPACE))
    nofit = [m for m in models if condition(m, "Degraded").get("status") == "True"]
    for m in nofit:
        print(f"    {m['metadata']['name']} is Degraded: {condition(m, 'Degraded')['message']}")

    pods = json.loads(kubectl("get", "pods", "-n", NAMESPACE, "-l", f"slmfleet.io/model={SERVED}", "-o", "json"))["items"]
    pod = next(p for p in pods if not p["metadata"].get("deletionTimestamp") and p["status"].get("podIP"))
    ip = pod["status"]["podIP"]
    question = "What is the capital of France?"
    step(f"{SERVED} runs on {pod['spec']['nodeName']}: POST http://{ip}:8000/v1/chat/completions ({question!r})")
    req = urllib.request.Request(
        f"http://{ip}:8000/v1/chat/completions",
        data=json.dumps({"model": "qwen2.5-0.5b-instruct", "messages": [{"role": "user", "content": question}]}).encode(),
        headers={"Content-Type": "application/json"})
    with urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    print(f"    {answer['model']} answered: {answer['choices'][0]['message']['content']!r}")

    cpu_pods = json.loads(kubectl("get", "pods", "-n", NAMESPACE, "-l", f"slmfleet.io/model={CPU_MODEL}", "-o",
                                  "json"))["items"]
    cpu_pod = next(p for p in cpu_pods if not p["metadata"].get("deletionTimestamp") and p["status"].get("podIP"))
    ip = cpu_pod["status"]["podIP"]
    question = "What is the capital of France? Answer in one word."
    step(f"{CPU_MODEL} runs on the real vLLM (CPU backend) on {cpu_pod['spec']['nodeName']}: "
         f"POST http://{ip}:8000/v1/chat/completions ({question!r})")
    req = urllib.request.Request(
        f"http://{ip}:8000/v1/chat/completions",
        data=json.dumps({"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 16,
                         "messages": [{"role": "user", "content": question}]}).encode(),
        headers={"Content-Type": "application/json"})
    with urlopen(req, timeout=120) as resp:
        answer = json.loads(resp.read())
    print(f"    {answer['model']} answered: {answer['choices'][0]['message']['content']!r}")

    from e2e.real_vllm import smollm2

    print(kubectl("apply", "-f", str(ROLLOUTS)), end="")
    variants = smollm2.build()  # cached: `make real-vllm` built them
    for variant, expected, dtype in (("float32", "Promoted", "float32"), ("perturbed", "RolledBack", "bfloat16")):
        if (code := roll_out(kubectl, CPU_MODEL, variants[variant][0], "demo-cpu-weights", expected, dtype)) != 0:
            return code
    print(kubectl("get", "mr", "-n", NAMESPACE))

    step("Everything keeps running. Look around:")
    print(f"    export KUBECONFIG={cluster.kubeconfig}")
    print(f"    export PATH={binaries()['kubectl'].parent}:$PATH   # kubectl {versions()['KUBE_VERSION']}, no version skew")
    print(f"    kubectl get sm -n {NAMESPACE} -o wide")
    print(f"    kubectl describe sm -n {NAMESPACE} qwen2-5-14b-on-one-l4")
    print(f"    kubectl describe mr -n {NAMESPACE} {CPU_MODEL}")
    print("    kubectl explain smallmodel.spec.serving")
    print(f"    curl -s {operator_url}/metrics | grep slmfleet_")
    print("    make cluster-down      # stops the operator and every cluster process, removes the state")
    return 0


if __name__ == "__main__":
    sys.exit(main())
