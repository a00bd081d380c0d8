"""vLLM stand-ins as real local processes on 127.0.0.1, for tests of code that talks to
OpenAI-compatible endpoints (the evaluation runner, `slmfleet eval`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def standins(root: Path, behaviours: dict[str, dict], model: str):
    """Start one stand-in process per behaviour (in parallel); yield their base URLs."""
    env = {k: v for k, v in os.environ.items() if k != "SLMFLEET_POD_IP"}
    procs, urls = [], {}
    try:
        for name, behaviour in behaviours.items():
            model_dir = root / name
            model_dir.mkdir(parents=True)
            (model_dir / "config.json").write_text(json.dumps({"num_attention_heads": 8, "max_position_embeddings": 4096}))
            (model_dir / "standin.json").write_text(json.dumps(behaviour))
            port = free_port()
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "e2e.standin.vllm", "serve", str(model_dir), "--host", "127.0.0.1",
                 "--port", str(port), "--served-model-name", model, "--seed", "1"],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), port))
            urls[name] = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        for proc, port in procs:
            while not healthy(port):
                if proc.poll() is not None:
                    raise RuntimeError(f"stand-in exited: {proc.stderr.read().decode()}")
                if time.monotonic() > deadline:
                    raise RuntimeError("stand-in did not start")
                time.sleep(0.05)
        yield urls
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stderr.close()
