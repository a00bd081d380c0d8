"""`slmfleet chart`: write the generated parts of the Helm chart, or check them.

Two parts of charts/slmfleet are generated, never edited by hand:
- `values.schema.json`'s `config` property, the JSON Schema of OperatorConfig without the fields
  the chart computes (api/config.py: chart_values_schema); the rest of the file is hand-written;
- `files/crds/*.yaml`, copies of what `slmfleet crds` writes into crds/, which the chart's
  templates render (Helm cannot read files outside the chart, and a packaged chart has no
  symlinks).

`make chart-schema` (and `make crds`) writes them; `--check` exits non-zero when they drifted, as
the tests do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slmfleet.api.config import chart_values_schema
from slmfleet.api.crd import rendered_files

SCHEMA_FILE = "values.schema.json"
CRDS_DIR = Path("files") / "crds"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("chart", help="write or check the Helm chart's generated files")
    parser.add_argument("--chart", type=Path, default=Path("charts/slmfleet"), help="the chart directory")
    parser.add_argument("--check", action="store_true", help="fail if the files differ, write nothing")
    parser.set_defaults(func=run)


def generated_files(chart: Path) -> dict[Path, str]:
    """Each generated file of the chart (relative path) with the text it must have."""
    schema = json.loads((chart / SCHEMA_FILE).read_text())
    schema["properties"]["config"] = chart_values_schema()
    files = {Path(SCHEMA_FILE): json.dumps(schema, indent=2, ensure_ascii=False) + "\n"}
    for name, text in rendered_files().items():
        files[CRDS_DIR / name] = text
    return files


def stale_files(chart: Path) -> list[Path]:
    """Generated files of the chart that are missing or differ, and files in files/crds/ that no
    CRD generates any more."""
    files = generated_files(chart)
    stale = [path for path, text in files.items() if _read(chart / path) != text]
    extra = sorted(p.relative_to(chart) for p in (chart / CRDS_DIR).glob("*") if p.relative_to(chart) not in files)
    return stale + extra


def run(args: argparse.Namespace) -> int:
    chart: Path = args.chart
    stale = stale_files(chart)
    if args.check:
        for path in stale:
            print(f"{chart / path} is out of date; run `make chart-schema`", file=sys.stderr)
        return 1 if stale else 0
    files = generated_files(chart)
    for path in stale:
        target = chart / path
        if path in files:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(files[path])
            print(f"wrote {target}")
        else:
            target.unlink()
            print(f"removed {target}")
    return 0


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slmfleet chart")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["chart", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
