"""`make demo`'s script runs end to end on the local cluster (its manifests are examples/demo/)."""

import subprocess
import sys

from e2e.cluster import REPO


def test_demo_serves_a_chat_completion(cluster, core):
    out = subprocess.run([sys.executable, "-m", "e2e.demo"], cwd=REPO, capture_output=True, text=True, timeout=300)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "qwen2.5-0.5b-instruct answered: 'Paris'" in out.stdout
        assert 'vllm:request_success_total{finished_reason="stop",model_name="qwen2.5-0.5b-instruct"}' in out.stdout
    finally:
        core.delete_namespace("slmfleet-demo")
