"""How long `cluster up` takes with the binaries cached (a "warm" machine), from an empty state
directory to every node Ready; and how long `down` takes. Writes bench/results/cluster_up.json.

Runs a separate cluster (own state dir, ports, pod network) so a running dev cluster is untouched.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from e2e.cluster import DEFAULT_POOLS, Cluster, versions
from e2e.pools import expand, load_pools_doc

RESULTS = Path(__file__).resolve().parent / "results" / "cluster_up.json"
RUNS = 3


def main() -> int:
    pools_doc = Path(tempfile.mkdtemp()) / "pools.yaml"
    # The default fleet on a pod network of its own, so it can run beside a dev cluster.
    pools_doc.write_text("podCIDRFirstOctet: 160\n" + DEFAULT_POOLS.read_text())
    nodes = len(expand(*load_pools_doc(pools_doc)))
    ups, downs = [], []
    for i in range(RUNS):
        state = Path(tempfile.mkdtemp(prefix="slmfleet-bench-")) / "cluster"
        cluster = Cluster(state, port_base=28443)
        t0 = time.monotonic()
        try:
            cluster.up(pools_doc)
            ups.append(time.monotonic() - t0)
        finally:
            t0 = time.monotonic()
            cluster.down()
            downs.append(time.monotonic() - t0)
        print(f"run {i + 1}/{RUNS}: up {ups[-1]:.1f}s, down {downs[-1]:.1f}s", file=sys.stderr)
    result = {
        "benchmark": "cluster_up",
        "what": "python -m e2e.cluster up with cached binaries, empty state -> all nodes Ready; then down",
        "kubernetes": versions()["KUBE_VERSION"],
        "nodes": nodes,
        "runs": RUNS,
        "up_seconds": [round(x, 2) for x in ups],
        "down_seconds": [round(x, 2) for x in downs],
        "up_seconds_median": round(sorted(ups)[RUNS // 2], 2),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
