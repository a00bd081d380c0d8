"""`slmfleet load`: copy pinned weights into a directory, serving only bytes that match the pin.

The init container of a model's pods. Reads slmfleet-manifest.json beside the weights and refuses
at once if its digest is not --digest; downloads every listed file (ranged GETs, several in
flight, retries with backoff, resuming .part files), hashing while it streams, and moves a file
into place only when its size and SHA-256 match. Files the manifest does not list are neither
fetched nor kept. Without a stored manifest, everything is fetched and hashed first and compared
with the pin before any of it is put in place.

cache: a verified --dest holds .slmfleet-verified (digest, manifest, sizes and mtimes); loading the
same digest again checks sizes and modification times (with --reverify: hashes every file) and
removes unlisted files, without contacting the storage. Anything changed is checked and fetched again.

On failure the reason (file, expected and actual hash) goes to stderr and to the container's
termination message (--termination-message-path, default /dev/termination-log when writable).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from slmfleet.cli.pin import add_s3_arguments, retry_policy, s3_client_factory
from slmfleet.weights.errors import EXIT_CODES_HELP, EXIT_ERROR, EXIT_OK, WeightsError
from slmfleet.weights.loader import LoadOptions, load, write_termination_message

EXIT_INTERRUPTED = 130


def add_parser(sub: argparse._SubParsersAction) -> None:
    doc = __doc__.split("\n\n")
    p = sub.add_parser("load", help="download and verify pinned weights into a directory (the init container)",
                       description="\n\n".join(doc[:2]), epilog="\n\n".join([*doc[2:], EXIT_CODES_HELP]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, metavar="URI",
                   help="s3://bucket/prefix/, file:///path or a directory (e.g. a mounted claim)")
    p.add_argument("--digest", required=True, metavar="sha256:HEX", help="the pinned manifest digest")
    p.add_argument("--dest", required=True, metavar="DIR", help="the model directory the server reads")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle files (.bin .pt .pth .pkl .pickle .ckpt), which can run code when loaded")
    p.add_argument("--reverify", action="store_true", help="on a cache hit, hash every file again")
    p.add_argument("--force", action="store_true",
                   help="adopt a non-empty --dest that no load wrote (non-matching files are deleted)")
    p.add_argument("--termination-message-path", metavar="PATH",
                   help="where to write the failure reason (default /dev/termination-log when it is writable)")
    p.add_argument("--no-progress", action="store_true", help="no progress line, even on a terminal")
    add_s3_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        print(f"slmfleet load: {message}", file=sys.stderr, flush=True)

    options = LoadOptions(concurrency=args.concurrency, part_size=args.part_size, retry=retry_policy(args),
                          allow_pickle=args.allow_pickle, reverify=args.reverify, force=args.force,
                          progress=False if args.no_progress else None)
    try:
        result = load(args.source, args.digest, args.dest, options, log=log, client_factory=s3_client_factory(args))
    except WeightsError as exc:
        return _fail(args, exc.message, exc.exit_code)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - a bug still has to reach the termination message
        traceback.print_exc()
        return _fail(args, f"internal error: {type(exc).__name__}: {exc}", EXIT_ERROR)
    write_termination_message(result.summary(), args.termination_message_path)
    print(result.digest, flush=True)
    return EXIT_OK


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"slmfleet load: error: {message}", file=sys.stderr, flush=True)
    if not write_termination_message(message, args.termination_message_path) and args.termination_message_path:
        print(f"slmfleet load: could not write the termination message to {args.termination_message_path}",
              file=sys.stderr)
    return code
