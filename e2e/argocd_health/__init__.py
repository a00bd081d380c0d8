"""Run slmfleet's Argo CD health scripts the way Argo CD runs them, from Python.

    from e2e.argocd_health import health, run_health_tests
    status, message = health(live_smallmodel, "SmallModel")      # ("Healthy", "Serving: ...")
    results = run_health_tests(CHECKS / "SmallModel")           # Argo CD's health_test.yaml layout

The scripts are `charts/slmfleet/argocd/slmfleet.io/<Kind>/health.lua` (generated from
`lib/common.lua` and `<Kind>/rules.lua` by `python -m e2e.argocd_health.cm_patch`). They run in the Go harness
of this directory (main.go: gopher-lua v1.1.2 with only the libraries Argo CD opens for argocd-cm
health scripts, the `obj` global built as Argo CD builds it). The harness is built with `go build`
on first use into `~/.cache/slmfleet/argocd-health-<hash>/` (`$SLMFLEET_CACHE` overrides the
cache), the hash covering go.mod, go.sum and main.go, so an edit rebuilds it and an unchanged
source never does. Building needs Go and, the first time, the Go module proxy (or a warm module
cache).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHECKS = REPO / "charts" / "slmfleet" / "argocd" / "slmfleet.io"
KINDS = ("SmallModel", "ModelRollout")
SOURCES = ("go.mod", "go.sum", "main.go")
BINARY = "argocd-health"


class HarnessError(RuntimeError):
    """The harness could not run (build failure, unreadable input)."""


class HealthScriptError(RuntimeError):
    """The health script itself failed (syntax or runtime error, deadline, wrong return type): in
    Argo CD the resource's health would be Unknown with this error."""


def _cache_root() -> Path:
    return Path(os.environ.get("SLMFLEET_CACHE") or Path.home() / ".cache" / "slmfleet")


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def binary() -> Path:
    """The harness binary for the current source, built if it is not cached yet."""
    target_dir = _cache_root() / f"argocd-health-{source_hash()}"
    target = target_dir / BINARY
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with open(target_dir / ".lock", "w") as lock:  # concurrent test processes build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly -buildvcs=false", "CGO_ENABLED": "0"}
        partial = target_dir / f".{BINARY}.{os.getpid()}"
        proc = subprocess.run(["go", "build", "-trimpath", "-o", str(partial), "."], cwd=HERE, env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise HarnessError(f"go build in {HERE} failed:\n{proc.stderr.strip()}")
        partial.replace(target)
    return target


def script_path(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"no health script for kind {kind!r} (known: {', '.join(KINDS)})")
    return CHECKS / kind / "health.lua"


def run_script(script: str | Path, obj: dict[str, Any], *, open_libs: bool = False) -> tuple[str, str]:
    """(status, message) of `script` (a path, or Lua source) on `obj`; `open_libs` runs it as
    with `resource.customizations.useOpenLibs.<group>_<kind>: "true"`."""
    with tempfile.TemporaryDirectory(prefix="argocd-health-") as tmp:
        if isinstance(script, str):
            path = Path(tmp) / "health.lua"
            path.write_text(script)
        else:
            path = Path(script)
        args = [str(binary()), *(["--open-libs"] if open_libs else []), "run", str(path), "-"]
        proc = subprocess.run(args, input=json.dumps(obj), capture_output=True, text=True, timeout=60)
    if proc.returncode == 2:
        raise HealthScriptError(proc.stderr.strip())
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    out = json.loads(proc.stdout)
    return out["status"], out["message"]


def health(obj: dict[str, Any], kind: str) -> tuple[str, str]:
    """What Argo CD would show for `obj` (a live SmallModel or ModelRollout as the API returns it):
    (status, message), status one of Healthy, Progressing, Degraded, Suspended (or Unknown)."""
    return run_script(script_path(kind), obj)


@dataclass(frozen=True)
class HealthTestResult:
    input_path: str
    expected: tuple[str, str]
    actual: tuple[str, str]
    error: str
    ok: bool

    def __str__(self) -> str:
        if self.error:
            return f"{self.input_path}: error {self.error}"
        verdict = "ok" if self.ok else f"expected {self.expected}"
        return f"{self.input_path}: {self.actual} {verdict}"


def run_health_tests(directory: str | Path, *, open_libs: bool = False) -> list[HealthTestResult]:
    """Run a directory in Argo CD's resource_customizations layout (health.lua, health_test.yaml
    listing `tests: [{healthStatus: {status, message}, inputPath}]`): one result per test, `ok`
    when status and message both match exactly. HarnessError if the layout cannot be read."""
    args = [str(binary()), *(["--open-libs"] if open_libs else []), "test", str(directory)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if proc.returncode not in (0, 1):
        raise HarnessError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    results = []
    for line in proc.stdout.splitlines():
        raw = json.loads(line)
        results.append(HealthTestResult(
            input_path=raw["inputPath"],
            expected=(raw["expected"].get("status", ""), raw["expected"].get("message", "")),
            actual=(raw["actual"].get("status", ""), raw["actual"].get("message", "")),
            error=raw.get("error", ""),
            ok=raw["ok"],
        ))
    if proc.returncode == 1 and all(r.ok for r in results):
        raise HarnessError(f"{' '.join(args)} failed without a failing test: {proc.stderr.strip()}")
    return results
