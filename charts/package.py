"""`make chart`: package charts/slmfleet with the digest of the operator image that was built.

The chart in git carries no digest (its values leave them empty, and the schema refuses that), so
that no digest is ever typed by hand. This script copies the chart, writes the slmfleet image's
digest from build/images.json (written by the image build) into the copy's values.yaml, checks
that nothing else changed, and runs `helm package` into build/charts/slmfleet-<version>.tgz.

The vLLM image's digest stays empty: it is only known to the registry the user mirrors vLLM
from, so installing the package needs `--set vllm.image.digest=sha256:...` (NOTES and values say so).

    .venv/bin/python charts/package.py [--images build/images.json] [--out build/charts] [--helm PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from slmfleet.cli.chart import stale_files

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "slmfleet"
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
HELM_VERSION_FILE = REPO / "e2e" / "versions.env"


class PackageError(Exception):
    pass


def default_helm() -> Path:
    version = next(
        line.split("=", 1)[1].strip()
        for line in HELM_VERSION_FILE.read_text().splitlines()
        if line.startswith("HELM_VERSION=")
    )
    # Where e2e/build-binaries.sh puts it: $SLMFLEET_CACHE, by default ~/.cache/slmfleet.
    cache = Path(os.environ.get("SLMFLEET_CACHE", Path.home() / ".cache" / "slmfleet"))
    return cache / f"helm-{version}" / "helm"


def operator_image(images_json: Path) -> dict[str, str]:
    """The slmfleet image's entry of build/images.json, checked."""
    try:
        image = json.loads(images_json.read_text())["images"]["slmfleet"]
    except FileNotFoundError:
        raise PackageError(f"{images_json} is missing: build the images first (images/)") from None
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{images_json}: no images.slmfleet entry ({exc})") from None
    digest = image.get("digest", "")
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise PackageError(f"{images_json}: images.slmfleet.digest {digest!r} is not sha256:<64 hex>")
    return image


def with_digest(values_text: str, digest: str) -> str:
    """values.yaml's text with the top-level `image.digest` set, comments and all kept."""
    lines = values_text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^image:\s*(#.*)?$", line)), None)
    if start is None:
        raise PackageError("values.yaml has no top-level `image:` block")
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if re.match(r"^\S", line):  # the next top-level key: the block ended without a digest
            break
        match = re.match(r'^(  digest:\s*)""(.*)$', line, flags=re.DOTALL)
        if match:
            lines[i] = f"{match.group(1)}{digest}{match.group(2)}"
            return "".join(lines)
    raise PackageError('values.yaml: `image:` has no `  digest: ""` line to fill')


def check_only_the_digest_changed(before: str, after: str, digest: str) -> None:
    old, new = yaml.safe_load(before), yaml.safe_load(after)
    old["image"]["digest"] = digest
    if old != new:
        raise PackageError("filling image.digest changed more of values.yaml than the digest")


def package(images_json: Path, out: Path, helm: Path, chart: Path = CHART) -> Path:
    stale = stale_files(chart)
    if stale:
        raise PackageError(f"the chart's generated files are stale ({', '.join(map(str, stale))}): run `make chart-schema`")
    chart_meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    values_text = (chart / "values.yaml").read_text()
    values = yaml.safe_load(values_text)
    image = operator_image(images_json)
    # The chart must name the image that was built; only its digest is filled in.
    for key, expected in (("repository", values["image"]["repository"]), ("tag", str(chart_meta["appVersion"]))):
        if image.get(key) != expected:
            raise PackageError(f"{images_json}: images.slmfleet.{key} is {image.get(key)!r}, the chart expects {expected!r}")
    if not helm.is_file() or not os.access(helm, os.X_OK):
        raise PackageError(f"helm not found at {helm}: run `e2e/build-binaries.sh helm`")
    filled = with_digest(values_text, image["digest"])
    check_only_the_digest_changed(values_text, filled, image["digest"])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slmfleet-chart-") as tmp:
        copy = Path(tmp) / chart.name
        shutil.copytree(chart, copy, symlinks=False)
        (copy / "values.yaml").write_text(filled)
        subprocess.run([str(helm), "package", str(copy), "--destination", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    target = out / f"{chart_meta['name']}-{chart_meta['version']}.tgz"
    if not target.is_file():
        raise PackageError(f"helm package did not write {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="charts/package.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO / "build" / "images.json")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "charts")
    parser.add_argument("--helm", type=Path, default=Path(os.environ["HELM"]) if os.environ.get("HELM") else None)
    args = parser.parse_args(argv)
    try:
        target = package(args.images, args.out, args.helm or default_helm())
    except PackageError as exc:
        print(f"make chart: {exc}", file=sys.stderr)
        return 1
    digest = operator_image(args.images)["digest"]
    print(f"wrote {target.relative_to(REPO) if target.is_relative_to(REPO) else target} "
          f"(image.digest {digest}; vllm.image.digest is set at install)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
