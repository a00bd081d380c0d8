"""What verification costs when loading weights from S3: `slmfleet load` against a plain boto3
download of the same objects from the same local MinIO.

Uploads 4 × 128 MiB of random data and its manifest to a MinIO started for the run (loopback
only, its own state directory), then times, median of RUNS runs each, into a fresh destination:

- baseline: boto3's managed `download_file` of every object, with the same concurrency and part
  size as the loader (multipart ranged GETs, no hashing);
- `slmfleet load`: fetch the manifest, check its digest against the pin, ranged GETs, SHA-256 of
  every byte while it streams, fsync and atomic rename.

Goal: verification adds ≤ 10% (ratio load / baseline ≤ 1.10). Both read from the same server on
the same machine, so the ratio says what hashing and the loader's bookkeeping add, not how fast
the network is. Writes bench/results/s3_load.json. Run: `.venv/bin/python -m bench.s3_load`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from boto3.s3.transfer import TransferConfig

from e2e.s3 import S3Server
from slmfleet.weights.loader import LoadOptions, load
from slmfleet.weights.pin import pin

RESULTS = Path(__file__).resolve().parent / "results" / "s3_load.json"
FILES = 4
FILE_BYTES = 128 * 1024 * 1024
RUNS = 5
PORT = 19030
BUCKET = "bench"
CONCURRENCY = 8
PART = 8 * 1024 * 1024
MIB = 1024 * 1024


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="slmfleet-bench-s3-"))
    server = S3Server(state / "minio", port=PORT)
    server.start()
    try:
        client = server.client()
        server.make_bucket(BUCKET)
        for i in range(FILES):
            client.put_object(Bucket=BUCKET, Key=f"model/part-{i}.safetensors", Body=os.urandom(FILE_BYTES))
        env = {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
               "AWS_ENDPOINT_URL": server.endpoint_url, "AWS_DEFAULT_REGION": server.region}
        os.environ.update(env)
        uri = f"s3://{BUCKET}/model/"
        digest = pin(uri, write=True).digest
        keys = [f"model/part-{i}.safetensors" for i in range(FILES)]
        config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=CONCURRENCY)

        def baseline() -> float:
            dest = Path(tempfile.mkdtemp(dir=state))
            started = time.perf_counter()
            for key in keys:
                client.download_file(BUCKET, key, str(dest / Path(key).name), Config=config)
            elapsed = time.perf_counter() - started
            shutil.rmtree(dest)
            return elapsed

        def verified() -> float:
            dest = Path(tempfile.mkdtemp(dir=state)) / "model"
            started = time.perf_counter()
            load(uri, digest, dest, LoadOptions(concurrency=CONCURRENCY, part_size=PART, progress=False), log=lambda _: None)
            elapsed = time.perf_counter() - started
            shutil.rmtree(dest.parent)
            return elapsed

        baseline()  # warm MinIO's caches and the connection pool for both
        plain = [baseline() for _ in range(RUNS)]
        loads = [verified() for _ in range(RUNS)]
        total_mib = FILES * FILE_BYTES / MIB
        result = {
            "benchmark": "s3_load",
            "files": FILES,
            "file_mib": FILE_BYTES // MIB,
            "concurrency": CONCURRENCY,
            "part_mib": PART // MIB,
            "runs": RUNS,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "baseline_boto3_seconds": [round(t, 3) for t in plain],
            "slmfleet_load_seconds": [round(t, 3) for t in loads],
            "baseline_mib_per_s": round(total_mib / statistics.median(plain), 1),
            "slmfleet_load_mib_per_s": round(total_mib / statistics.median(loads), 1),
            "ratio_load_over_baseline": round(statistics.median(loads) / statistics.median(plain), 3),
            "goal": "ratio_load_over_baseline <= 1.10",
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
