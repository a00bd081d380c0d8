"""A real S3 server on loopback for the e2e tests: MinIO, `python -m e2e.s3 up | env | down | status`.

MinIO is built from the Go module proxy by `e2e/build-binaries.sh` at the release pinned in
e2e/versions.env and runs as a single-drive server on 127.0.0.1 (console disabled, no update
checks, no TLS). Its state lives in one directory: `data/` (the buckets), `credentials` (the root
credentials of this state dir, random, mode 0600, in the AWS shared-credentials format so boto3 and
the aws CLI read it through AWS_SHARED_CREDENTIALS_FILE), `minio.log` and `minio.pid`.
The credentials are never printed.

The process carries MARKER_ENV=<marker dir> in its environment, like every process of the local
cluster: give it the cluster's state dir and `python -m e2e.cluster down` stops it with the rest.
Without one, the S3 state dir itself is the marker (`python -m e2e.s3 down` finds it by that).

Ports: 19000 by default (the cluster uses 16443-16448 and 18390-18400); the e2e tests use 19004.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from e2e.cluster import (
    E2E,
    MARKER_ENV,
    _alive,
    _has_env,
    _terminate,
    cache_dir,
    default_state_dir,
    port_holder_text,
    port_in_use,
    processes_with_env,
    versions,
)

DEFAULT_PORT = 19000
REGION = "us-east-1"
PROFILE = "default"


def log(msg: str) -> None:
    print(f"==> [s3] {msg}", file=sys.stderr, flush=True)


def minio_binary() -> Path:
    v = versions()["MINIO_VERSION"]
    return cache_dir() / f"minio-{v}" / "minio"


def ensure_minio() -> Path:
    """The MinIO binary, built first (through e2e/build-binaries.sh, MinIO only) if it is missing."""
    binary = minio_binary()
    if not binary.exists():
        log(f"{binary} missing: building MinIO (cold build: several minutes on 2 cores)")
        subprocess.run([str(E2E / "build-binaries.sh"), "minio"], check=True)
    return binary


class S3Server:
    """One MinIO server.

    >>> s3 = S3Server(tmp / "s3", port=19004).start()
    >>> s3.make_bucket("weights"); s3.client().put_object(Bucket="weights", Key="k", Body=b"v")
    >>> s3.stop()
    """

    def __init__(self, state_dir: Path, port: int = DEFAULT_PORT, *, marker_dir: Path | None = None):
        self.dir = Path(state_dir).resolve()
        self.port = port
        self.marker = str(Path(marker_dir).resolve() if marker_dir else self.dir)
        self.data_dir = self.dir / "data"
        self.credentials_file = self.dir / "credentials"
        self.log_path = self.dir / "minio.log"
        self.pid_file = self.dir / "minio.pid"
        self._proc: subprocess.Popen | None = None
        self._credentials: tuple[str, str] | None = None

    # ---------------------------------------------------------------- what clients need

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def region(self) -> str:
        return REGION

    @property
    def access_key(self) -> str:
        return self._load_credentials()[0]

    @property
    def secret_key(self) -> str:
        return self._load_credentials()[1]

    def client_env(self, endpoint_url: str | None = None) -> dict[str, str]:
        """Environment for a process that talks to this server with boto3 (no secret in it:
        the keys come from the 0600 credentials file)."""
        return {
            "AWS_SHARED_CREDENTIALS_FILE": str(self.credentials_file),
            "AWS_PROFILE": PROFILE,
            "AWS_ENDPOINT_URL_S3": endpoint_url or self.endpoint_url,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, endpoint_url: str | None = None, **config):
        """A boto3 S3 client with path-style addressing; `endpoint_url` to go through a proxy,
        `config` for botocore's Config (e.g. retries={"mode": "standard", "max_attempts": 3})."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **config),
        )

    def make_bucket(self, name: str) -> str:
        """Creates the bucket if it does not exist yet; returns its name."""
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    # ---------------------------------------------------------------- credentials

    def _load_credentials(self) -> tuple[str, str]:
        if self._credentials is None:
            parser = configparser.ConfigParser()
            if not parser.read(self.credentials_file):
                raise RuntimeError(f"no credentials in {self.credentials_file}: start() the server first")
            section = parser[PROFILE]
            self._credentials = (section["aws_access_key_id"], section["aws_secret_access_key"])
        return self._credentials

    def _ensure_credentials(self) -> tuple[str, str]:
        """Random root credentials, made once per state dir (MinIO keeps using what its data
        dir was created with), in a file only the owner can read."""
        if not self.credentials_file.exists():
            access = "slm" + secrets.token_hex(8)
            secret = secrets.token_urlsafe(30)
            fd = os.open(self.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"[{PROFILE}]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n")
        self._credentials = None
        return self._load_credentials()

    # ---------------------------------------------------------------- process

    def pid(self) -> int | None:
        """The running server's pid: judged by the Popen handle if this object started it (race-free,
        see e2e/cluster.py), else by the pid file and the env marker (so a reused pid is not it)."""
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and _has_env(pid, MARKER_ENV, self.marker) else None

    def live(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/minio/health/live", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 60) -> S3Server:
        """Starts MinIO (or reuses the one already running from this state dir) and waits until
        /minio/health/live answers."""
        if self.pid() and self.live():
            self._load_credentials()
            return self
        if port_in_use(self.port):
            raise RuntimeError(f"cannot start the MinIO of {self.dir}: "
                               f"{port_holder_text(self.port, 'or pick another port with --port or SLMFLEET_S3_PORT')}")
        binary = ensure_minio()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        access, secret = self._ensure_credentials()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "AWS_"))}
        env.update({
            MARKER_ENV: self.marker,
            "MINIO_ROOT_USER": access,
            "MINIO_ROOT_PASSWORD": secret,
            "MINIO_REGION": REGION,
            "MINIO_BROWSER": "off",   # no console (and no second port)
            "MINIO_UPDATE": "off",    # no update check against dl.min.io
            "HOME": str(self.dir),    # MinIO keeps ~/.minio and ~/.mc there
        })
        argv = [str(binary), "server", str(self.data_dir),
                "--address", f"127.0.0.1:{self.port}",
                "--certs-dir", str(self.dir / "certs")]
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, cwd=self.dir, start_new_session=True)
        self.pid_file.write_text(str(self._proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"MinIO exited with {self._proc.returncode} while starting:\n{tail}")
            if self.live():
                log(f"MinIO {versions()['MINIO_VERSION']} up at {self.endpoint_url} "
                    f"(pid {self._proc.pid}, log {self.log_path})")
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"MinIO not live after {timeout:.0f}s; see {self.log_path}")

    def stop(self, grace: float = 10) -> None:
        """Stops the server; the data and credentials stay (see down())."""
        pid = self.pid()
        if pid:
            _terminate([pid], grace=grace)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)  # reap it (it is our child)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None
        self.pid_file.unlink(missing_ok=True)

    def down(self) -> None:
        """Stops the server and removes its state dir (data and credentials)."""
        self.stop()
        if self.marker == str(self.dir):  # anything else still tagged with this state dir
            leftovers = [p for p in processes_with_env(MARKER_ENV, self.marker) if p != os.getpid()]
            if leftovers:
                _terminate(leftovers, grace=5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.s3", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "env", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="default: <cluster state dir>/s3, so `e2e.cluster down` removes it too")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SLMFLEET_S3_PORT", DEFAULT_PORT)))
    parser.add_argument("--marker-dir", type=Path, default=None,
                        help="value of the env marker (default: the cluster state dir when --state-dir is "
                             "not given, else the S3 state dir)")
    args = parser.parse_args(argv)
    if args.state_dir is None:
        state, marker = default_state_dir() / "s3", args.marker_dir or default_state_dir()
    else:
        state, marker = args.state_dir, args.marker_dir
    server = S3Server(state, args.port, marker_dir=marker)
    if args.command == "up":
        try:
            server.start()
        except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
            print(f"s3 up failed: {exc}", file=sys.stderr)
            return 1
    if args.command in ("up", "env"):
        if not server.credentials_file.exists():
            print("no S3 server: run `python -m e2e.s3 up` first", file=sys.stderr)
            return 1
        for key, value in server.client_env().items():
            print(f"export {key}={value}")
    elif args.command == "status":
        ok = server.pid() is not None and server.live()
        print(json.dumps({"up": ok, "endpoint_url": server.endpoint_url, "pid": server.pid()}))
        return 0 if ok else 1
    elif args.command == "down":
        server.down()
        log(f"MinIO stopped; {server.dir} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
