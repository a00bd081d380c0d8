"""The bystander's change-to-apply latency under fifty hostile tenants over the same without
attackers (issue 13): runs e2e/tests/test_tenant_isolation_ratio.py on the local test cluster
(the one `make test` starts; do not run both at once) and keeps its result in
bench/results/tenant_isolation.json."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "tenant_isolation.json"


def main() -> int:
    env = dict(os.environ, SLMFLEET_TENANT_BENCH_OUT=str(RESULTS))
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s",
                            "e2e/tests/test_tenant_isolation_ratio.py"], env=env, cwd=RESULTS.parents[2])


if __name__ == "__main__":
    sys.exit(main())
