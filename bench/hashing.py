"""How fast `slmfleet pin` hashes local files, against `sha256sum` on the same files.

Writes 4 × 256 MiB of random data to a temporary directory, reads it once so every run hashes
from the page cache (the hash, not the disk, is measured), then times, median of RUNS runs each:

- `sha256sum` over the 4 files in one process (one core), and in two processes of 2 files each;
- `openssl dgst -sha256` over the 4 files in one process: a stricter reference where coreutils'
  sha256sum does not use the CPU's SHA extensions and OpenSSL (which hashlib uses too) does;
- the pin code (`manifest_of_directory`) with one worker and with two workers;
- `hash_file` on one file with 1, 4 and 8 MiB reads (the chunk size).

Goals: one worker ≥ 0.9 × sha256sum; two workers ≈ 2 × one worker on two cores.
Writes bench/results/hashing.json. Run: `.venv/bin/python -m bench.hashing`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from slmfleet.weights.manifest import DEFAULT_CHUNK_SIZE, hash_file, manifest_of_directory

RESULTS = Path(__file__).resolve().parent / "results" / "hashing.json"
FILES = 4
FILE_BYTES = 256 * 1024 * 1024
RUNS = 5
MIB = 1024 * 1024


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_seconds(fn: Callable[[], object]) -> tuple[float, list[float]]:
    times = [timed(fn) for _ in range(RUNS)]
    return statistics.median(times), times


def main() -> int:
    if shutil.which("sha256sum") is None:
        print("sha256sum is not installed", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="slmfleet-bench-hash-"))
    try:
        files = []
        for i in range(FILES):
            path = tmp / f"model-{i + 1:05d}-of-{FILES:05d}.safetensors"
            with open(path, "wb") as f:
                for _ in range(FILE_BYTES // (16 * MIB)):
                    f.write(os.urandom(16 * MIB))
            files.append(str(path))
        total = FILES * FILE_BYTES
        for path in files:  # into the page cache
            with open(path, "rb") as f:
                while f.read(16 * MIB):
                    pass

        def sha256sum_one_process() -> None:
            subprocess.run(["sha256sum", *files], check=True, stdout=subprocess.DEVNULL)

        def sha256sum_two_processes() -> None:
            half = len(files) // 2
            procs = [subprocess.Popen(["sha256sum", *part], stdout=subprocess.DEVNULL)
                     for part in (files[:half], files[half:])]
            assert all(p.wait() == 0 for p in procs)

        def openssl_one_process() -> None:
            subprocess.run(["openssl", "dgst", "-sha256", *files], check=True, stdout=subprocess.DEVNULL)

        # Correctness first: the pin code agrees with sha256sum.
        out = subprocess.run(["sha256sum", *files], check=True, capture_output=True, text=True).stdout
        expected = {Path(line.split()[1]).name: line.split()[0] for line in out.splitlines()}
        manifest = manifest_of_directory(tmp, workers=2, progress=False)
        assert {f.path: f.sha256 for f in manifest.files} == expected

        results: dict[str, dict[str, object]] = {}

        def record(name: str, fn: Callable[[], object], nbytes: int = total) -> float:
            med, times = median_seconds(fn)
            results[name] = {"median_seconds": round(med, 4), "seconds": [round(t, 4) for t in times],
                             "mib_per_second": round(nbytes / med / MIB, 1)}
            print(f"{name:34s} {nbytes / med / MIB:8.1f} MiB/s", file=sys.stderr)
            return nbytes / med

        sum1 = record("sha256sum_1_process", sha256sum_one_process)
        sum2 = record("sha256sum_2_processes", sha256sum_two_processes)
        ossl = record("openssl_dgst_1_process", openssl_one_process) if shutil.which("openssl") else None
        pin1 = record("pin_1_worker", lambda: manifest_of_directory(tmp, workers=1, progress=False))
        pin2 = record("pin_2_workers", lambda: manifest_of_directory(tmp, workers=2, progress=False))
        chunks = {}
        for chunk_mib in (1, 4, 8):
            chunks[chunk_mib] = record(f"hash_file_{chunk_mib}MiB_chunks",
                                       lambda c=chunk_mib: hash_file(files[0], chunk_size=c * MIB), FILE_BYTES)
        result = {
            "benchmark": "hashing",
            "what": (f"SHA-256 of {FILES} files × {FILE_BYTES // MIB} MiB of random data from the page cache, "
                     f"median of {RUNS} runs: the pin code (manifest_of_directory) vs sha256sum"),
            "bytes": total,
            "default_chunk_mib": DEFAULT_CHUNK_SIZE // MIB,
            "results": results,
            "ratios": {
                "pin_1_worker_vs_sha256sum_1_process": round(pin1 / sum1, 3),
                "pin_2_workers_vs_pin_1_worker": round(pin2 / pin1, 3),
                "pin_2_workers_vs_sha256sum_2_processes": round(pin2 / sum2, 3),
                "sha256sum_2_processes_vs_1_process": round(sum2 / sum1, 3),
                "pin_1_worker_vs_openssl_dgst_1_process": round(pin1 / ossl, 3) if ossl else None,
            },
            "goals": {"pin_1_worker_vs_sha256sum_1_process": ">= 0.9",
                      "pin_2_workers_vs_pin_1_worker": "near 2 on 2 cores"},
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "openssl": ssl.OPENSSL_VERSION,
                "openssl_cli": subprocess.run(["openssl", "version"], capture_output=True,
                                              text=True).stdout.strip() if shutil.which("openssl") else None,
                "sha256sum": subprocess.run(["sha256sum", "--version"], capture_output=True,
                                            text=True).stdout.splitlines()[0],
                "sha_ni": "sha_ni" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
            },
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["ratios"], indent=2))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
