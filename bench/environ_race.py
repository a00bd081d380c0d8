"""Why the local cluster judges its own processes by their Popen handles, not by /proc.

Starts a Go binary of the control plane (etcd, as `cluster up` does) many times, each time reading
/proc/<pid>/environ in a tight loop from the moment Popen returns until the env marker shows. Popen
returns as soon as the close-on-exec pipe closes, which the kernel does early in execve; the new
program's stack, and with it the environment /proc shows, is set up later. Until then the file reads
empty although the process is alive, so a liveness check by marker says "exited". The window grows
when the binary is not in the page cache (the first start after a build), so it is measured twice:
warm, and (as root) with the page cache dropped before each start, as on a machine that has just
built Kubernetes.

Writes bench/results/environ_race.json: starts, how many showed an empty or markerless environ
after Popen returned, and the longest such window.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from e2e.cluster import MARKER_ENV, binaries

RESULTS = Path(__file__).resolve().parent / "results" / "environ_race.json"


def one_start(binary: Path, marker: str, drop_caches: bool) -> float | None:
    """Seconds after Popen returned during which the marker was missing (None: never missing)."""
    if drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    env = {**os.environ, MARKER_ENV: marker}
    wanted = f"{MARKER_ENV}={marker}".encode()
    data_dir = Path(tempfile.mkdtemp(prefix="environ-race-"))
    proc = subprocess.Popen([str(binary), f"--data-dir={data_dir}", "--listen-client-urls=http://127.0.0.1:39379",
                             "--advertise-client-urls=http://127.0.0.1:39379", "--listen-peer-urls=http://127.0.0.1:39380",
                             "--initial-advertise-peer-urls=http://127.0.0.1:39380",
                             "--initial-cluster=default=http://127.0.0.1:39380", "--listen-metrics-urls="],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    returned = time.monotonic()
    missing_until = None
    try:
        while time.monotonic() - returned < 2:
            try:
                data = Path(f"/proc/{proc.pid}/environ").read_bytes()
            except OSError:
                break
            if wanted in data.split(b"\0") or proc.poll() is not None:
                break
            missing_until = time.monotonic() - returned
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(data_dir, ignore_errors=True)
    return missing_until


def measure(binary: Path, starts: int, cold: bool) -> dict:
    windows = [one_start(binary, "/tmp/environ-race-marker", cold) for _ in range(starts)]
    missing = [w for w in windows if w is not None]
    return {"starts": len(windows), "marker_missing_after_popen_returned": len(missing),
            "longest_window_ms": round(max(missing) * 1000, 3) if missing else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=20)
    args = parser.parse_args(argv)
    binary = binaries()["etcd"]
    if not binary.exists():
        print(f"{binary} missing: run `make binaries`", file=sys.stderr)
        return 1
    result = {
        "what": "etcd started with Popen; /proc/<pid>/environ read from the moment Popen returned",
        "warm_page_cache": measure(binary, args.starts, cold=False),
        # Dropping the page cache needs root; without it only the warm figure is measured.
        "cold_page_cache": measure(binary, args.starts, cold=True) if os.geteuid() == 0 else None,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
