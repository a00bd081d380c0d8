"""`make test-repeat N=3`: the whole suite N times, each run on a fresh clone with a cold cluster.

Each run is what CI does: `git clone` of the committed HEAD into a new directory, then `make test`
there (its own .venv, its own cluster state dir, so the cluster starts cold; the control-plane
binaries come from the shared cache). After each run the clone's cluster is taken down whatever
happened, and any process still carrying its marker counts as a failure of that run. The result
goes to bench/results/flake_rate.json: runs, failures, and which tests failed in which run.

Uncommitted changes are not in the clones: commit first (the script says so when there are any).
A test that fails only sometimes is a bug to find, not a reason to retry: nothing here reruns a
failed test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from e2e.cluster import MARKER_ENV, REPO, Cluster, process_name, processes_with_env

RESULT = REPO / "bench" / "results" / "flake_rate.json"


def log(msg: str) -> None:
    print(f"==> [test-repeat] {msg}", flush=True)


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def failed_tests(junit: Path) -> tuple[list[str], dict[str, int]]:
    """(node ids that failed or errored, counts by outcome) from pytest's JUnit XML report."""
    failed, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        node = f"{module}.py::{case.get('name')}" if module else case.get("name", "?")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        counts[outcome] += 1
        if outcome == "failed" and node not in failed:
            failed.append(node)
    return failed, counts


def heartbeat(log_path: Path, label: str, started: float, stop: threading.Event) -> None:
    """A progress line a minute: elapsed time and the last line the run printed."""
    while not stop.wait(60):
        try:
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        last = lines[-1][:100] if lines else ""
        log(f"{label}: {int(time.monotonic() - started) // 60}m elapsed; last output: {last}")


def one_run(index: int, runs: int, head: str, workdir: Path) -> dict:
    label = f"run {index}/{runs}"
    clone = workdir / f"run-{index}"
    git("clone", "--quiet", "--no-hardlinks", str(REPO), str(clone), cwd=workdir)
    git("checkout", "--quiet", head, cwd=clone)
    junit = workdir / f"run-{index}.xml"
    log_path = workdir / f"run-{index}.log"
    log(f"{label}: make test in {clone} (log {log_path})")
    env = {**os.environ, "PYTEST_ADDOPTS": f"--junitxml={junit}"}
    for key in ("KUBECONFIG", MARKER_ENV, "SLMFLEET_CLUSTER_DIR", "VIRTUAL_ENV"):
        env.pop(key, None)
    started = time.monotonic()
    stop = threading.Event()
    beat = threading.Thread(target=heartbeat, args=(log_path, label, started, stop), daemon=True)
    with open(log_path, "wb") as out:
        beat.start()
        code = subprocess.run(["make", "test"], cwd=clone, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    stop.set()
    seconds = time.monotonic() - started

    # Whatever happened, the clone's cluster goes, and nothing of it may be left running.
    state = clone / ".e2e-cluster"
    Cluster(state).down()
    left = [f"{process_name(pid)} (pid {pid})" for pid in processes_with_env(MARKER_ENV, str(state.resolve()))]

    failed, counts = failed_tests(junit) if junit.exists() else ([], {})
    problems = []
    if code != 0 and not failed:
        problems.append(f"make test exited {code} without a failed test in the report (see the log)")
    if left:
        problems.append(f"processes left running: {', '.join(left)}")
    ok = code == 0 and not failed and not left
    log(f"{label}: {'passed' if ok else 'FAILED'} in {seconds / 60:.1f} min; {counts or 'no test report'}"
        + (f"; failed: {', '.join(failed)}" if failed else "") + (f"; {'; '.join(problems)}" if problems else ""))
    return {"run": index, "passed": ok, "exit_code": code, "minutes": round(seconds / 60, 1),
            "tests": counts, "failed_tests": failed, "problems": problems, "log": str(log_path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.repeat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the clones and their logs go (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the clones (logs are always kept)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    head = git("rev-parse", "HEAD")
    if git("status", "--porcelain", "--untracked-files=no"):
        log("the working tree has uncommitted changes: the clones test the committed HEAD only")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="slmfleet-repeat-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"{args.runs} runs of `make test` on fresh clones of {head[:12]} in {workdir}")

    results = []
    for i in range(1, args.runs + 1):
        results.append(one_run(i, args.runs, head, workdir))
        if not args.keep:
            shutil.rmtree(workdir / f"run-{i}", ignore_errors=True)

    by_test: dict[str, int] = {}
    for r in results:
        for node in r["failed_tests"]:
            by_test[node] = by_test.get(node, 0) + 1
    failures = sum(not r["passed"] for r in results)
    report = {
        "what": "make test on fresh clones, each from a cold cluster (e2e/repeat.py)",
        "commit": head,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "runs": len(results),
        "failures": failures,
        "failed_tests": by_test,
        "per_run": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"{len(results) - failures}/{len(results)} runs passed; wrote {args.out}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
