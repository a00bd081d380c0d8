"""`slmfleet crds`: the CRDs generated from the API models, printed or written to a directory.

`make crds` writes them into crds/; `--check` exits non-zero when the directory has drifted from
the models (CI runs the equivalent test). Printing lets an installation pipe them into kubectl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slmfleet.api.crd import rendered_files


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("crds", help="print or write the CustomResourceDefinitions")
    parser.add_argument("--out", type=Path, help="write one file per CRD into this directory")
    parser.add_argument("--check", action="store_true", help="with --out: fail if the files differ")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    files = rendered_files()
    if args.out is None:
        sys.stdout.write("---\n".join(files.values()))
        return 0
    stale = [name for name, text in files.items() if _read(args.out / name) != text]
    if args.check:
        for name in stale:
            print(f"{args.out / name} is out of date; run `make crds`", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (args.out / name).write_text(files[name])
        print(f"wrote {args.out / name}")
    return 0


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slmfleet crds")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["crds", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
