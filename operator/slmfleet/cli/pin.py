"""`slmfleet pin`: the digest that pins a model directory's weights.

Hashes every file of a local directory or an S3 prefix (streamed, nothing copied) into a manifest
of {path, size, sha256}, and prints its digest (`sha256:<64 hex>`) as the last line of stdout: put
it in a SmallModel's spec.source.digest. `--write` stores the manifest as slmfleet-manifest.json
beside the weights, which lets the loader refuse a wrong pin before downloading anything.

S3 settings come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_S3_ADDRESSING_STYLE, AWS_CA_BUNDLE); the flags override them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from slmfleet.cli.argtypes import byte_size, positive_int
from slmfleet.weights.errors import EXIT_ERROR, EXIT_OK, WeightsError
from slmfleet.weights.manifest import DEFAULT_CHUNK_SIZE
from slmfleet.weights.pin import pin
from slmfleet.weights.progress import human_bytes, human_rate
from slmfleet.weights.s3 import client_from_env
from slmfleet.weights.transfer import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE, RetryPolicy


def add_s3_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("S3 (flags override the AWS_* environment)")
    g.add_argument("--endpoint-url", help="custom endpoint, e.g. https://minio.internal:9000 (AWS_ENDPOINT_URL)")
    g.add_argument("--region", help="region (AWS_DEFAULT_REGION; us-east-1 with a custom endpoint)")
    style = g.add_mutually_exclusive_group()
    style.add_argument("--path-style", dest="path_style", action="store_const", const=True, default=None,
                       help="path-style addressing (AWS_S3_ADDRESSING_STYLE=path; the default with a custom endpoint)")
    style.add_argument("--virtual-style", dest="path_style", action="store_const", const=False,
                       help="virtual-hosted-style addressing")
    g.add_argument("--ca-bundle", help="PEM bundle to verify the endpoint's certificate (AWS_CA_BUNDLE)")
    g.add_argument("--connect-timeout", type=float, default=10.0, help="seconds (default 10)")
    g.add_argument("--read-timeout", type=float, default=60.0, help="seconds without data (default 60)")
    g.add_argument("--concurrency", type=positive_int, default=DEFAULT_CONCURRENCY,
                   help=f"ranged GETs in flight at once (default {DEFAULT_CONCURRENCY})")
    g.add_argument("--part-size", type=byte_size, default=DEFAULT_PART_SIZE,
                   help=f"bytes per ranged GET (default {DEFAULT_PART_SIZE // 2**20}MiB)")
    g.add_argument("--retries", type=positive_int, default=5,
                   help="attempts per request for throttling, 5xx, resets and timeouts (default 5)")
    g.add_argument("--retry-wait", type=float, default=0.5, help="first backoff in seconds, doubling (default 0.5)")
    g.add_argument("--retry-max-wait", type=float, default=20.0, help="longest backoff in seconds (default 20)")


def s3_client_factory(args: argparse.Namespace) -> Any:
    """A factory for the S3 client the flags describe. botocore makes one attempt per request:
    the retries are the loader's own (tenacity), so they are bounded by --retries alone."""
    overrides = {
        "endpoint_url": args.endpoint_url, "region": args.region, "path_style": args.path_style,
        "ca_bundle": args.ca_bundle, "connect_timeout": args.connect_timeout, "read_timeout": args.read_timeout,
        "max_attempts": 1, "max_pool_connections": args.concurrency + 4,
    }
    return lambda: client_from_env(overrides)


def retry_policy(args: argparse.Namespace) -> RetryPolicy:
    return RetryPolicy(attempts=args.retries, initial_wait=args.retry_wait, max_wait=args.retry_max_wait)


def add_parser(sub: argparse._SubParsersAction) -> None:
    doc = __doc__.split("\n\n")
    p = sub.add_parser("pin", help="print the digest of a model directory's weights (local or S3)",
                       description=doc[0] + "\n\n" + doc[1], epilog=doc[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("uri", metavar="DIR|s3://bucket/prefix/", help="the model directory")
    p.add_argument("--write", action="store_true", help="store slmfleet-manifest.json beside the weights")
    p.add_argument("--list", action="store_true", help="print the manifest (sha256, size, path) before the digest")
    p.add_argument("--workers", type=positive_int, help="local files hashed at once (default: one per CPU)")
    p.add_argument("--chunk-size", type=byte_size, default=DEFAULT_CHUNK_SIZE, help="read size for local files")
    p.add_argument("--no-progress", action="store_true", help="no progress line, even on a terminal")
    add_s3_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        print(f"slmfleet pin: {message}", file=sys.stderr, flush=True)

    try:
        result = pin(args.uri, write=args.write, workers=args.workers, concurrency=args.concurrency,
                     part_size=args.part_size, chunk_size=args.chunk_size, retry=retry_policy(args),
                     progress=False if args.no_progress else None, client_factory=s3_client_factory(args), log=log)
    except WeightsError as exc:
        print(f"slmfleet pin: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"slmfleet pin: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    m = result.manifest
    log(f"{len(m.files)} files, {human_bytes(m.total_size)} hashed in {result.seconds:.1f} s "
        f"({human_rate(m.total_size, result.seconds)})")
    if not m.files:
        log("warning: the directory has no files")
    if result.previous_digest and result.previous_digest != result.digest:
        log(f"{'replaced' if result.written_to else 'warning: stale'} stored manifest ({result.previous_digest})")
    if result.written_to:
        log(f"wrote {result.written_to}")
    if args.list:
        for f in m.files:
            print(f"{f.sha256}  {f.size:>14}  {f.path}")
    print(result.digest, flush=True)
    return EXIT_OK
