"""Critical dependencies must resolve to the pinned, usable versions.

An unpinned install on these machines once resolved boto3 to 0.0.3 (kubernetes 37 and botocore
disagree on python-dateutil); this fails loudly if anything like that happens again.
"""

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name, _, version = req.partition("==")
        assert version, f"{req} is not pinned exactly"
        out[name.strip()] = version.strip()
    return out


@pytest.mark.parametrize("name", sorted(pins()))
def test_installed_version_is_the_pin(name):
    assert metadata.version(name) == pins()[name]


def test_no_broken_requirements():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_critical_libraries_are_real_releases():
    import boto3
    import kopf
    import kubernetes
    import pydantic

    assert tuple(int(x) for x in boto3.__version__.split(".")[:2]) >= (1, 40)
    assert int(kubernetes.__version__.split(".")[0]) >= 30
    assert int(pydantic.VERSION.split(".")[0]) == 2
    assert hasattr(kopf, "on") and hasattr(boto3, "client")


def test_constraints_cover_the_pins():
    constraints = dict(
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    lowered = {k.lower().replace("_", "-"): v for k, v in constraints.items()}
    for name, version in pins().items():
        assert lowered.get(name.lower()) == version, name


def test_the_operator_does_not_depend_on_the_kubernetes_package():
    """Its import alone is about 50 MiB of the operator's memory; slmfleet.k8s is the client."""
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [r for r in runtime if r.partition("==")[0].strip() == "kubernetes"]
