"""`slmfleet`: the operator's command line. Subcommands arrive with the features they drive."""

from __future__ import annotations

import argparse
import sys

from slmfleet import __version__
from slmfleet.cli import chart, crds, operator, size
from slmfleet.cli import eval as eval_cli
from slmfleet.cli import load as load_cli
from slmfleet.cli import pin as pin_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmfleet", description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("--version", action="version", version=f"slmfleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print the version")
    size.add_parser(sub)
    operator.add_parser(sub)
    crds.add_parser(sub)
    chart.add_parser(sub)
    pin_cli.add_parser(sub)
    load_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"slmfleet {__version__}")
        return 0
    if hasattr(args, "func"):
        return args.func(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
