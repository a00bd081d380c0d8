"""`make demo`: bring the local cluster up and show what runs on it.

Starts the control plane and the simulated GPU fleet, applies examples/demo/ (a vLLM Deployment
on a process node, in a namespace enforcing Pod Security "restricted"), waits until it is Ready,
and sends it a chat completion at its pod IP. The cluster keeps running afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

from e2e.cluster import DEFAULT_POOLS, REPO, Cluster, binaries, default_state_dir, kubectl_binary, versions

NAMESPACE = "slmfleet-demo"


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def main() -> int:
    cluster = Cluster(default_state_dir())
    step("Starting the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok, node agents)")
    t0 = time.monotonic()
    cluster.up(DEFAULT_POOLS)
    print(f"    up in {time.monotonic() - t0:.1f}s")

    def kubectl(*args: str, check: bool = True) -> str:
        out = subprocess.run([kubectl_binary(), f"--kubeconfig={cluster.kubeconfig}", *args],
                             capture_output=True, text=True)
        if check and out.returncode:
            raise SystemExit(out.stderr)
        return out.stdout

    step("The simulated GPU fleet (labels as NVIDIA GPU Feature Discovery sets them)")
    print(kubectl("get", "nodes", "-L", "nvidia.com/gpu.product,nvidia.com/gpu.count,nvidia.com/mig.strategy,slmfleet.io/node-agent"))

    step("Applying examples/demo/: a vLLM Deployment on a process node's NVIDIA L4")
    print(kubectl("apply", "-f", str(REPO / "examples" / "demo")))
    rollout = subprocess.run([kubectl_binary(), f"--kubeconfig={cluster.kubeconfig}", "rollout", "status",
                              "-n", NAMESPACE, "deployment/qwen2-5-0-5b", "--timeout=120s"])
    if rollout.returncode:
        print(kubectl("describe", "pods", "-n", NAMESPACE, check=False))
        print("the demo Deployment did not become available", file=sys.stderr)
        return 1
    pods = json.loads(kubectl("get", "pods", "-n", NAMESPACE, "-l", "app=qwen2-5-0-5b", "-o", "json"))["items"]
    pod = next(p for p in pods if not p["metadata"].get("deletionTimestamp"))
    print(kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide"))

    ip = pod["status"]["podIP"]
    question = "What is the capital of France?"
    step(f"POST http://{ip}:8000/v1/chat/completions  ({question!r})")
    req = urllib.request.Request(
        f"http://{ip}:8000/v1/chat/completions",
        data=json.dumps({"model": "qwen2.5-0.5b-instruct",
                         "messages": [{"role": "user", "content": question}]}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    print(f"    {answer['model']} answered: {answer['choices'][0]['message']['content']!r}")
    with urllib.request.urlopen(f"http://{ip}:8000/metrics", timeout=10) as resp:
        lines = [line for line in resp.read().decode().splitlines()
                 if line.startswith(("vllm:request_success_total", "vllm:e2e_request_latency_seconds_count"))]
    print("    " + "\n    ".join(lines))

    step("The cluster keeps running. Next:")
    print(f"    export KUBECONFIG={cluster.kubeconfig}")
    print(f"    export PATH={binaries()['kubectl'].parent}:$PATH   # kubectl {versions()['KUBE_VERSION']}, no version skew")
    print("    kubectl get nodes -L nvidia.com/gpu.product")
    print("    make cluster-down      # stops every process and removes the state")
    return 0


if __name__ == "__main__":
    sys.exit(main())
