"""`make demo`'s script runs end to end on the local cluster (its manifests are examples/smallmodels/)."""

import re
import subprocess
import sys

import pytest

from e2e.cluster import REPO
from e2e.tests.conftest import DEMO_NAMESPACE, delete_models, wait_process_nodes_free


@pytest.mark.timeout(1000)  # the real vLLM starts in one to two minutes, three times
def test_demo_places_the_examples_and_serves_a_chat_completion(cluster, core, operator):
    wait_process_nodes_free(core, DEMO_NAMESPACE)  # its 0.5B model is served on a process node
    out = subprocess.run([sys.executable, "-m", "e2e.demo"], cwd=REPO, capture_output=True, text=True, timeout=850)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "reusing the running operator" in out.stdout
        assert "qwen2.5-0.5b-instruct answered: 'Paris'" in out.stdout
        rows: dict[str, list[str]] = {}
        for line in out.stdout.splitlines():
            if line.startswith("    ") and len(line.split()) >= 7:
                rows.setdefault(line.split()[0], line.split())  # the table comes first
        for model in ("qwen2-5-0-5b", "qwen3-4b", "llama-3-1-8b", "qwen2-5-14b-long", "smollm2-135m-cpu"):
            assert model in rows and "/" in rows[model][-1], rows.get(model)
        # The CPU example is placed on a CPU node and answered by the real vLLM.
        assert rows["smollm2-135m-cpu"][1:4] == ["cpu", "CPU-BF16", "2"], rows["smollm2-135m-cpu"]
        assert "smollm2-135m-instruct answered: 'The capital of France is Paris.'" in out.stdout
        assert rows["qwen2-5-14b-on-one-l4"][-1] == "NoFit"
        assert "qwen2-5-14b-on-one-l4 is Degraded: needs" in out.stdout
        # Two rollouts decided on the real vLLM's answers: the float32 copy promoted, the perturbed one not.
        assert "smollm2-135m-cpu: rollout Promoted" in out.stdout
        assert "smollm2-135m-cpu: rollout RolledBack" in out.stdout
        # The evaluations' lines (a sequential test may stop before the 24th case).
        verdicts = re.findall(r"evaluation at step 0: stable ([\d.]+), candidate ([\d.]+) on (\d+) cases.*: (Pass|Fail)",
                              out.stdout)
        assert [v[3] for v in verdicts] == ["Pass", "Fail"], out.stdout
        assert float(verdicts[1][1]) == 0.0, verdicts
    finally:
        delete_models(core.api_client, DEMO_NAMESPACE)
        core.delete_namespace(DEMO_NAMESPACE)
        core.delete_persistent_volume("slmfleet-demo-weights")
        core.delete_persistent_volume("slmfleet-demo-cpu-weights")
