"""`up` is idempotent, `env` prints the kubeconfig line, and `down` leaves nothing of ours running.

Runs a second, small cluster (own state dir, ports and pod network) beside the session's one, so
taking it down does not disturb the other tests.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from kubernetes import client, config

from e2e.cluster import REPO, Cluster, _alive, port_in_use
from e2e.tests.conftest import wait_for

SMALL_POOLS = textwrap.dedent("""
    podCIDRFirstOctet: 220
    pools:
      - name: l4
        nodes: 1
        gpu: {product: NVIDIA-L4, memoryMiB: 23034, count: 1, family: ada-lovelace}
      - name: proc
        nodes: 1
        agent: process
        gpu: {product: NVIDIA-L4, memoryMiB: 23034, count: 1, family: ada-lovelace}
""")
PORT_BASE = 26443


def cli(state: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "e2e.cluster", *args, f"--state-dir={state}",
                           f"--port-base={PORT_BASE}"], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_up_env_down_lifecycle(tmp_path, cluster):
    state = tmp_path / "cluster"
    pools = tmp_path / "pools.yaml"
    pools.write_text(SMALL_POOLS)
    up = cli(state, "up", f"--pools={pools}")
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"export KUBECONFIG={state.resolve() / 'kubeconfig'}"
    assert cli(state, "env").stdout == up.stdout

    # Idempotent: a second `up` starts nothing new.
    small = Cluster(state, PORT_BASE)
    before = sorted(small.our_processes())
    again = cli(state, "up", f"--pools={pools}")
    assert again.returncode == 0 and "already running" in again.stderr
    assert sorted(small.our_processes()) == before

    core = client.CoreV1Api(config.new_client_from_config(config_file=str(small.kubeconfig)))
    assert {n.metadata.name for n in core.list_node().items} == {"l4-0", "proc-0"}
    core.create_namespaced_pod("default", client.V1Pod(
        metadata=client.V1ObjectMeta(name="sleeper"),
        spec=client.V1PodSpec(node_selector={"slmfleet.io/node-agent": "process"}, containers=[
            client.V1Container(name="main", image="busybox", command=["sleep", "600"])])))
    pod = wait_for(lambda: (p := core.read_namespaced_pod("sleeper", "default")).status.container_statuses
                   and p.status.container_statuses[0].state.running and p, what="sleeper running")
    assert pod.status.pod_ip.startswith("127.221.")
    ours = small.our_processes()
    assert len(ours) >= 7  # etcd, apiserver, controller-manager, scheduler, kwok, agent, sleep

    down = cli(state, "down")
    assert down.returncode == 0, down.stderr
    time.sleep(0.2)
    assert small.our_processes() == []
    assert not any(_alive(pid) for pid in ours)  # zombies awaiting reaping by init do not run
    assert not any(port_in_use(PORT_BASE + i) for i in range(6))
    assert not state.exists()
    assert cli(state, "env").returncode == 1
