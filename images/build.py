"""Builds slmfleet's OCI images without a Docker engine: `make images` or `python -m images.build`.

Three images, each an OCI image layout under build/images/<name>/, with their digests in
build/images.json (read by the Helm chart packaging and the e2e tests, never typed by hand):

- `slmfleet/slmfleet`: the operator (`slmfleet operator run`) and the weight loader
  (`slmfleet load`).
- `slmfleet/vllm-standin-test`: a TEST image for the local cluster only: `vllm serve` runs the
  OpenAI-compatible stand-in (e2e/standin/vllm.py). It is not vLLM.
- `slmfleet/vllm-cpu-test`: a TEST image for the local cluster's CPU process nodes only, small: its
  config is the real vLLM CPU image's (ENTRYPOINT `vllm serve`, CPU-only env), but it does not carry
  vLLM (a 6.5 GB venv). Its `vllm` is a launcher that fails with a message in any other runtime;
  the node agent (e2e/node_agent/images.py) maps `vllm` to the real vLLM-CPU venv's `vllm` on the
  host (e2e/real_vllm/install.py), so pods of this image run the real `vllm serve`.

Layers, bottom to top:
1. base: a Debian bookworm rootfs from `mmdebstrap --variant=essential` with Debian's python3
   (no apt, no package lists, man pages, locales or docs except the copyright files; the standard
   library's bytecode recompiled as unchecked hashes). Cached in ~/.cache/slmfleet/images/ under
   a key of the suite, the package list, the recipe and BASE_SNAPSHOT.
2. deps: a venv at /opt/slmfleet (Debian's python3) with the project's runtime dependencies at the
   versions constraints.txt pins, installed by pip from wheels downloaded once into
   ~/.cache/slmfleet/images/wheels-<key>/ and run by the image's own interpreter in a chroot.
   Shared by both images.
3. app: the slmfleet wheel built from this checkout (operator image), or the stand-in module and
   its `vllm` launcher (stand-in image). The vLLM-CPU test image has the base and one tiny layer
   (its `vllm` launcher), no deps.

Every .py gets its bytecode at build time (`--invalidation-mode unchecked-hash`, PYTHONHASHSEED=0),
so the images run with a read-only root filesystem and write nothing outside /tmp.

Reproducible: layers are tarred here with sorted entries, mtimes clamped to an epoch, numeric
owners and no user or group names, and gzipped with a zero header mtime; crane assembles the image
(`crane append`, `crane mutate`) with no timestamps in the config, against a registry it serves on
127.0.0.1 for the duration of the build, and `crane pull --format oci` writes the layouts. The same
commit on the same cached base gives the same digests (e2e/tests/test_images.py builds twice).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SLMFLEET_CACHE", str(Path.home() / ".cache" / "slmfleet")))
IMAGES_CACHE = CACHE / "images"
VERSIONS_ENV = ROOT / "e2e" / "versions.env"

# --- the base rootfs -----------------------------------------------------------------------------
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_VARIANT = "essential"
# libstdc++6: the compiled wheels that are C++ (google-re2, for tenants' regexes) link it.
BASE_PACKAGES = ("python3", "libstdc++6")
# The live mirror changes under a fixed suite: a cached base is reused for as long as this string
# (and the rest of the base key) is unchanged. Bump it to take the mirror's current packages.
BASE_SNAPSHOT = "2026-11-30"
# mtimes of the base and deps layers are clamped to this (and mmdebstrap's SOURCE_DATE_EPOCH).
BASE_EPOCH = int(dt.datetime.fromisoformat(BASE_SNAPSHOT).replace(tzinfo=dt.UTC).timestamp())
# Changes whenever the recipe below changes what the base contains.
BASE_RECIPE = 3
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/doc/*",
    # The packages' licences stay: the image redistributes GPL binaries (bash, coreutils, ...).
    "path-include=/usr/share/doc/*/copyright",
)
# Removed after installation: state of tools that do not run in the image, and logs.
BASE_REMOVE = (
    "var/lib/apt", "var/cache/apt", "var/log/apt", "var/cache/debconf/*-old", "var/lib/dpkg/*-old",
    "var/log/*.log", "var/log/btmp", "var/log/wtmp", "var/log/lastlog", "var/log/faillog",
    "var/cache/ldconfig/aux-cache", "etc/machine-id", "usr/share/info/*",
)
NONROOT_UID = 65532

# --- Python ---------------------------------------------------------------------------------------
PYTHON_VERSION = "3.11"
PIP_VERSION = "25.3"
VENV = "/opt/slmfleet"
WHEEL_PLATFORM = "manylinux_2_36_x86_64"  # bookworm's glibc 2.36, amd64
# pip does not widen an explicit --platform to older glibc versions: every tag bookworm runs.
WHEEL_PLATFORMS = tuple(f"manylinux_2_{v}_x86_64" for v in range(36, 4, -1)) + (
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
PYTHON_RECIPE = 1
STANDIN_DIR = "/opt/vllm-standin"
STANDIN_MODULE = "slmfleet_vllm_standin"

PLATFORM = "linux/amd64"
IMAGE_ENV = {
    "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}


# The vLLM-CPU test image's config: what the real vLLM CPU image sets that matters to a pod (its
# venv on PATH, no usage stats, offline), nothing GPU-specific; its LD_PRELOAD of tcmalloc/libiomp
# is left out: those paths exist only in the real image, and the node agent runs the host's venv.
VLLM_CPU_VENV = "/opt/venv"
VLLM_CPU_IMAGE_ENV = {
    "PATH": f"{VLLM_CPU_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "VIRTUAL_ENV": VLLM_CPU_VENV,
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}
VLLM_CPU_LAUNCHER = "usr/local/bin/vllm"


def step(message: str) -> None:
    print(f"==> [images] {message}", flush=True)


# --- pure helpers ---------------------------------------------------------------------------------

def normalize_tarinfo(info: tarfile.TarInfo, epoch: int, owner: tuple[int, int] | None = None) -> tarfile.TarInfo:
    """The metadata that may differ between two builds of the same files, made the same.

    mtime is clamped to `epoch` (an integer, so no PAX mtime record), user and group names are
    dropped (they would come from the build host's passwd), and owner, when given, replaces the
    numeric ids (the base keeps the ids its packages set)."""
    info.mtime = min(int(info.mtime), int(epoch))
    info.uname = ""
    info.gname = ""
    if owner is not None:
        info.uid, info.gid = owner
    info.pax_headers = {}
    if info.isdir() or info.issym() or info.islnk():
        info.size = 0
    return info


def layer_paths(paths: Iterable[str]) -> list[str]:
    """Relative paths in the order the layer stores them: sorted, so a directory comes before
    what it holds and the first of hard-linked names is always the same."""
    out = sorted({p.strip("/") for p in paths if p.strip("/")})
    return out


def write_layer(root: Path, paths: Iterable[str], out: Path, *, epoch: int,
                owner: tuple[int, int] | None = None, level: int = 9) -> dict:
    """Writes `paths` (relative to `root`) as a normalized, deterministically gzipped tar.

    Returns {"digest", "diffID", "size"}: the sha256 of the gzip (the layer's blob digest), of the
    tar (its diff ID), and the gzip's size."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tar_hash = _HashingWriter()
    with open(tmp, "wb") as raw:
        gz_hash = _HashingWriter(raw)
        # filename="" and mtime=0: nothing of this build in the gzip header.
        with gzip.GzipFile(filename="", mode="wb", fileobj=gz_hash, compresslevel=level, mtime=0) as gz:
            tar_hash.inner = gz
            with tarfile.open(fileobj=tar_hash, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for rel in layer_paths(paths):
                    full = root / rel
                    info = normalize_tarinfo(tar.gettarinfo(str(full), arcname=rel), epoch, owner)
                    if info.isreg():
                        with open(full, "rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
    tmp.replace(out)
    return {"digest": "sha256:" + gz_hash.sha.hexdigest(), "diffID": "sha256:" + tar_hash.sha.hexdigest(),
            "size": gz_hash.size}


class _HashingWriter:
    """A write-only file that hashes what passes through it to `inner` (if any)."""

    def __init__(self, inner=None):
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.inner is not None:
            self.inner.write(data)
        return len(data)

    def flush(self) -> None:
        if self.inner is not None:
            self.inner.flush()


def digests_document(images: dict[str, dict], revision: str) -> dict:
    """build/images.json: {"images": {name: {repository, tag, digest, layout, compressedBytes}},
    "revision": ...}. Checks the shape so that nothing else can be written."""
    out: dict[str, dict] = {}
    for name, image in sorted(images.items()):
        entry = {
            "repository": str(image["repository"]),
            "tag": str(image["tag"]),
            "digest": str(image["digest"]),
            "layout": str(image["layout"]),
            "compressedBytes": int(image["compressedBytes"]),
        }
        _check_entry(name, entry)
        out[name] = entry
    if not revision:
        raise ValueError("revision is empty")
    return {"images": out, "revision": revision}


def _check_entry(name: str, entry: dict) -> None:
    digest = entry["digest"]
    if not (digest.startswith("sha256:") and len(digest) == 71 and all(c in "0123456789abcdef" for c in digest[7:])):
        raise ValueError(f"{name}: digest {digest!r} is not sha256:<64 hex>")
    if not Path(entry["layout"]).is_absolute():
        raise ValueError(f"{name}: layout {entry['layout']!r} is not an absolute path")
    if entry["compressedBytes"] <= 0:
        raise ValueError(f"{name}: compressedBytes must be positive")
    if not entry["repository"] or ":" in entry["repository"] or "@" in entry["repository"]:
        raise ValueError(f"{name}: repository {entry['repository']!r} must be a bare repository")


def read_digests(path: Path | str | None = None) -> dict:
    """Reads and checks build/images.json (or `path`)."""
    path = Path(path) if path else ROOT / "build" / "images.json"
    doc = json.loads(Path(path).read_text())
    if set(doc) != {"images", "revision"}:
        raise ValueError(f"{path}: keys {sorted(doc)}, expected ['images', 'revision']")
    for name, entry in doc["images"].items():
        if set(entry) != {"repository", "tag", "digest", "layout", "compressedBytes"}:
            raise ValueError(f"{path}: {name} has keys {sorted(entry)}")
        _check_entry(name, entry)
    return doc


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def image_ref(image: dict) -> str:
    """repository:tag@digest, as a chart or a test pins it."""
    return f"{image['repository']}:{image['tag']}@{image['digest']}"


# --- the build ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Project:
    """The checkout (or an export of a commit) the images are built from."""
    root: Path
    name: str
    version: str
    license: str
    dependencies: tuple[str, ...]

    @classmethod
    def read(cls, root: Path = ROOT) -> Project:
        meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        lic = meta.get("license", {})
        return cls(Path(root).resolve(), meta["name"], meta["version"],
                   lic.get("text", "") if isinstance(lic, dict) else str(lic), tuple(meta["dependencies"]))


def _run(argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(list(argv), **kw)


def _git(*args: str, root: Path = ROOT) -> str:
    return _run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()


# Inputs of the images in this checkout; a change to one not yet committed marks the revision dirty.
SOURCE_INPUTS = ("pyproject.toml", "constraints.txt", "README.md", "operator", "e2e/standin/vllm.py",
                 "e2e/standin/vllm-serve-actions.json", "images")


def revision(root: Path = ROOT) -> str:
    """HEAD's commit, with `-dirty` when the images' inputs in the work tree differ from it;
    outside a git checkout, `source-` and a hash of the inputs."""
    try:
        head = _git("rev-parse", "HEAD", root=root)
        top = _git("rev-parse", "--show-toplevel", root=root)
        if Path(top).resolve() != Path(root).resolve():
            raise ValueError("not the top of a checkout")
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", *SOURCE_INPUTS, root=root)
    except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
        return "source-" + source_hash(root)[:16]
    return head + ("-dirty" if dirty else "")


def source_hash(root: Path = ROOT) -> str:
    """sha256 over the images' input files (what `revision` cannot see)."""
    h = hashlib.sha256()
    for rel in SOURCE_INPUTS:
        p = root / rel
        if not p.exists():
            continue
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()
                                                and "__pycache__" not in x.parts and not x.name.endswith(".pyc"))
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def app_epoch(root: Path = ROOT) -> int:
    """SOURCE_DATE_EPOCH if set, else HEAD's commit time: the mtime of the app layers' files."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        return int(_git("log", "-1", "--format=%ct", root=root))
    except (subprocess.CalledProcessError, ValueError, FileNotFoundError):
        return BASE_EPOCH


def source_url() -> str:
    """org.opencontainers.image.source: SLMFLEET_IMAGE_SOURCE, else the origin remote (if any)."""
    url = os.environ.get("SLMFLEET_IMAGE_SOURCE", "")
    if not url:
        try:
            url = _git("config", "--get", "remote.origin.url")
        except (subprocess.CalledProcessError, FileNotFoundError):
            url = ""
    return url


def crane_path() -> Path:
    env = VERSIONS_ENV.read_text()
    version = next(line.split("=", 1)[1].strip().strip('"') for line in env.splitlines()
                   if line.startswith("CRANE_VERSION="))
    crane = CACHE / f"crane-{version}" / "crane"
    if not os.access(crane, os.X_OK):
        step(f"crane {version} missing: e2e/build-binaries.sh crane")
        _run([str(ROOT / "e2e" / "build-binaries.sh"), "crane"])
    return crane


def chroot_argv(root: Path, argv: Sequence[str], *, env: dict[str, str] | None = None,
                userspec: str | None = None, read_only: bool = False) -> list[str]:
    """argv that runs `argv` inside `root` in a private mount namespace (nothing leaks to the
    host's mounts): /dev and /proc bound in; with read_only, the root itself mounted read-only and
    a fresh tmpfs on /tmp, as a pod with readOnlyRootFilesystem and an emptyDir on /tmp sees it."""
    script = ['set -e; r="$1"; shift']
    if read_only:
        script.append('mount --bind "$r" "$r"; mount -o remount,bind,ro "$r"; mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"')
    script.append('mount --rbind /dev "$r/dev"; mount --rbind /proc "$r/proc"')
    script.append('exec chroot' + (f' --userspec={userspec}' if userspec else '') + ' "$r" "$@"')
    full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
    full_env.update(env or {})
    return ["unshare", "--mount", "--propagation", "private", "--", "env", "-i",
            *(f"{k}={v}" for k, v in full_env.items()),
            "sh", "-c", "; ".join(script), "chroot-run", str(root), *argv]


def chroot_run(root: Path, argv: Sequence[str], *, env: dict[str, str] | None = None,
               userspec: str | None = None, read_only: bool = False, capture: bool = False,
               check: bool = True) -> subprocess.CompletedProcess:
    """Runs chroot_argv(...) to completion."""
    return _run(chroot_argv(root, argv, env=env, userspec=userspec, read_only=read_only),
                capture_output=capture, text=True, check=check)


def _tree(root: Path, sub: str) -> set[str]:
    """Every path under root/sub (and sub itself), relative to root."""
    base = root / sub
    out = {sub}
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


def _extract(layer: Path, root: Path) -> None:
    _run(["tar", "--numeric-owner", "-xzf", str(layer), "-C", str(root)])


def _compile(root: Path, python: str, *dirs: str) -> None:
    """Bytecode for every .py under dirs, by the image's interpreter, as unchecked hashes.
    One process (no -j): which strings a worker has interned would decide marshal's references."""
    chroot_run(root, [python, "-m", "compileall", "-q", "-f", "--invalidation-mode", "unchecked-hash", *dirs],
               env={"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"})


# Base ----------------------------------------------------------------------------------------------

def base_key() -> str:
    return cache_key({"suite": SUITE, "mirror": MIRROR, "variant": BASE_VARIANT, "packages": BASE_PACKAGES,
                      "snapshot": BASE_SNAPSHOT, "epoch": BASE_EPOCH, "dpkg": DPKG_EXCLUDES,
                      "remove": BASE_REMOVE, "recipe": BASE_RECIPE, "uid": NONROOT_UID})


def _keep_only_copyrights(doc: Path) -> None:
    """dpkg's path filters leave empty directories and symlinks (changelogs of other packages)."""
    for dirpath, dirnames, filenames in os.walk(doc, topdown=False):
        for n in filenames + dirnames:
            p = Path(dirpath) / n
            if p.is_symlink() or (p.is_file() and n != "copyright"):
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()


def ensure_base() -> tuple[Path, dict]:
    """The base layer (cached): a .tar.gz and its metadata (digest, diff ID, package versions)."""
    key = base_key()
    layer = IMAGES_CACHE / f"base-{SUITE}-{key}.tar.gz"
    meta_path = layer.with_name(f"base-{SUITE}-{key}.json")
    if layer.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        step(f"base {SUITE} ({BASE_SNAPSHOT}, key {key}) cached: {layer}")
        return layer, meta
    IMAGES_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slmfleet-base-", dir=IMAGES_CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        rootfs.mkdir()
        step(f"base: mmdebstrap {SUITE} --variant={BASE_VARIANT} + {' '.join(BASE_PACKAGES)} "
             f"from {MIRROR} (cold: ~40 s)")
        argv = ["mmdebstrap", f"--variant={BASE_VARIANT}", "--mode=root", "--quiet",
                "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",  # usr-is-merged, not usrmerge's perl
                f"--include={','.join(BASE_PACKAGES)}",
                *(f"--dpkgopt={o}" for o in DPKG_EXCLUDES), SUITE, str(rootfs), MIRROR]
        log = IMAGES_CACHE / f"mmdebstrap-{key}.log"
        with open(log, "w") as out:
            done = _run(argv, env={**os.environ, "SOURCE_DATE_EPOCH": str(BASE_EPOCH)}, stdout=out,
                        stderr=subprocess.STDOUT, check=False)
        if done.returncode:
            sys.stderr.write("".join(log.read_text().splitlines(keepends=True)[-40:]))
            raise SystemExit(f"images: mmdebstrap failed (exit {done.returncode}); log: {log}")
        for pattern in BASE_REMOVE:
            for p in rootfs.glob(pattern):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        _keep_only_copyrights(rootfs / "usr/share/doc")
        for sub in ("dev", "proc", "sys"):
            for p in (rootfs / sub).iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        with open(rootfs / "etc/passwd", "a") as f:
            f.write(f"nonroot:x:{NONROOT_UID}:{NONROOT_UID}:nonroot:/tmp:/usr/sbin/nologin\n")
        with open(rootfs / "etc/group", "a") as f:
            f.write(f"nonroot:x:{NONROOT_UID}:\n")
        step("base: standard library bytecode as unchecked hashes")
        for pyc in rootfs.glob(f"usr/lib/python{PYTHON_VERSION}/**/__pycache__/*.pyc"):
            pyc.unlink()
        _compile(rootfs, "/usr/bin/python3", *(d for d in (f"/usr/lib/python{PYTHON_VERSION}",
                 "/usr/lib/python3/dist-packages", "/usr/share/python3") if (rootfs / d.strip("/")).is_dir()))
        packages = chroot_run(rootfs, ["dpkg-query", "-W", "-f", "${Package}=${Version}\\n"],
                              capture=True).stdout.split()
        step("base: writing the layer")
        paths = [os.path.relpath(os.path.join(d, n), rootfs)
                 for d, ds, fs in os.walk(rootfs) for n in ds + fs]
        meta = write_layer(rootfs, paths, layer, epoch=BASE_EPOCH)
        meta.update({"key": key, "suite": SUITE, "snapshot": BASE_SNAPSHOT, "packages": sorted(packages)})
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    step(f"base: {meta['size'] / 1e6:.1f} MB compressed, {len(meta['packages'])} packages -> {layer}")
    return layer, meta


# Python --------------------------------------------------------------------------------------------

def wheels_key(project: Project) -> str:
    return cache_key({"constraints": (project.root / "constraints.txt").read_text(), "deps": project.dependencies,
                      "pip": PIP_VERSION, "platform": WHEEL_PLATFORMS, "python": PYTHON_VERSION})


def ensure_wheels(project: Project) -> Path:
    """The runtime dependencies' wheels (and pip's own), downloaded once per constraints.txt."""
    wheels = IMAGES_CACHE / f"wheels-{wheels_key(project)}"
    if (wheels / ".complete").is_file():
        return wheels
    step(f"wheels: pip download of the runtime dependencies ({WHEEL_PLATFORM}, cp311) -> {wheels}")
    tmp = wheels.with_name(wheels.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    _run([*pip, "download", "--dest", str(tmp), "--only-binary=:all:",
          *(a for plat in WHEEL_PLATFORMS for a in ("--platform", plat)),
          "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp311",
          "-c", str(project.root / "constraints.txt"), *project.dependencies])
    _run([*pip, "download", "--dest", str(tmp), "--no-deps", f"pip=={PIP_VERSION}"])
    (tmp / ".complete").write_text("")
    shutil.rmtree(wheels, ignore_errors=True)
    tmp.replace(wheels)
    return wheels


def build_project_wheel(project: Project, out: Path, epoch: int) -> Path:
    """`pip wheel --no-deps` of this checkout, from a copy (an in-tree build would leave
    build/lib and egg-info behind in the checkout)."""
    with tempfile.TemporaryDirectory(prefix="slmfleet-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for rel in ("pyproject.toml", "README.md", "constraints.txt"):
            shutil.copy2(project.root / rel, src / rel)
        shutil.copytree(project.root / "operator", src / "operator",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        out.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", "wheel", "--no-deps",
              "--wheel-dir", str(out), "-c", str(project.root / "constraints.txt"), str(src)],
             env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "PIP_CACHE_DIR": str(CACHE / "pip")})
    (wheel,) = out.glob(f"{project.name}-{project.version}-*.whl")
    return wheel


def _pip_in_root(root: Path, args: Sequence[str]) -> None:
    chroot_run(root, [f"{VENV}/bin/python", f"/tmp/wheels/pip-{PIP_VERSION}-py3-none-any.whl/pip",
                      "--disable-pip-version-check", "--no-cache-dir", "--quiet", *args],
               env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"})


def deps_key(base_meta: dict, project: Project) -> str:
    return cache_key({"base": base_meta["digest"], "wheels": wheels_key(project), "venv": VENV,
                      "recipe": PYTHON_RECIPE})


def build_python_layers(rootfs: Path, base_meta: dict, project: Project, layers_dir: Path, *,
                        reuse_deps: bool, epoch: int) -> dict[str, dict]:
    """Fills rootfs (the base, extracted) with the venv, the app and the stand-in, and writes
    their layers. The deps layer comes from the cache when reuse_deps and its key matches."""
    wheels = ensure_wheels(project)
    stage = rootfs / "tmp" / "wheels"
    shutil.copytree(wheels, stage)
    shutil.copy2(project.root / "constraints.txt", stage / "constraints.txt")
    layers: dict[str, dict] = {}
    os.umask(0o022)

    key = deps_key(base_meta, project)
    cached = IMAGES_CACHE / f"deps-{key}.tar.gz"
    cached_meta = cached.with_suffix("").with_suffix(".json")
    if reuse_deps and cached.is_file() and cached_meta.is_file():
        step(f"deps: cached (key {key})")
        _extract(cached, rootfs)
        shutil.copy2(cached, layers_dir / "deps.tar.gz")
        layers["deps"] = json.loads(cached_meta.read_text())
    else:
        step(f"deps: venv {VENV} and {len(project.dependencies)} pinned dependencies (pip in the image's python)")
        chroot_run(rootfs, ["/usr/bin/python3", "-m", "venv", "--without-pip", VENV],
                   env={"PYTHONDONTWRITEBYTECODE": "1"})
        _pip_in_root(rootfs, ["install", "--no-index", "--find-links", "/tmp/wheels", "--no-compile",
                              "-c", "/tmp/wheels/constraints.txt", *project.dependencies])
        step("deps: bytecode (unchecked-hash, one process: ~1 min)")
        _compile(rootfs, f"{VENV}/bin/python", VENV)
        layers["deps"] = write_layer(rootfs, _tree(rootfs, VENV.strip("/")), layers_dir / "deps.tar.gz",
                                     epoch=BASE_EPOCH, owner=(0, 0))
        IMAGES_CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copy2(layers_dir / "deps.tar.gz", cached.with_name(cached.name + ".tmp"))
        cached.with_name(cached.name + ".tmp").replace(cached)
        cached_meta.write_text(json.dumps(layers["deps"]) + "\n")

    step(f"app: slmfleet {project.version} wheel from this checkout")
    before = _tree(rootfs, VENV.strip("/"))
    wheel = build_project_wheel(project, stage / "app", epoch)
    _pip_in_root(rootfs, ["install", "--no-index", "--no-deps", "--no-compile", f"/tmp/wheels/app/{wheel.name}"])
    _pip_in_root(rootfs, ["check"])
    site = f"{VENV}/lib/python{PYTHON_VERSION}/site-packages"
    _compile(rootfs, f"{VENV}/bin/python", f"{site}/{project.name}")
    added = _tree(rootfs, VENV.strip("/")) - before
    layers["app"] = write_layer(rootfs, added, layers_dir / "app.tar.gz", epoch=epoch, owner=(0, 0))

    step("vllm-standin: the stand-in module and its `vllm` launcher")
    sdir = rootfs / STANDIN_DIR.strip("/")
    sdir.mkdir(parents=True)
    shutil.copyfile(project.root / "e2e" / "standin" / "vllm.py", sdir / f"{STANDIN_MODULE}.py")
    # The real vLLM's options, from which the stand-in declares its parser.
    shutil.copyfile(project.root / "e2e" / "standin" / "vllm-serve-actions.json", sdir / "vllm-serve-actions.json")
    launcher = rootfs / "usr/local/bin/vllm"
    launcher.write_text(
        f"#!{VENV}/bin/python\n"
        "# TEST STAND-IN, not vLLM: runs slmfleet's OpenAI-compatible stand-in (e2e/standin/vllm.py)\n"
        "# with `vllm serve`'s command line, for the local test cluster only.\n"
        "import sys\n"
        f"sys.path.insert(0, {STANDIN_DIR!r})\n"
        f"from {STANDIN_MODULE} import main\n"
        "sys.exit(main())\n")
    launcher.chmod(0o755)
    _compile(rootfs, f"{VENV}/bin/python", STANDIN_DIR)
    standin_paths = _tree(rootfs, STANDIN_DIR.strip("/")) | {"usr/local/bin/vllm"}
    layers["standin"] = write_layer(rootfs, standin_paths, layers_dir / "standin.tar.gz", epoch=epoch, owner=(0, 0))
    shutil.rmtree(stage)
    return layers


def vllm_cpu_launcher_text() -> str:
    """The test image's /usr/local/bin/vllm: it carries no vLLM, and says so in any runtime but the
    local cluster's node agent (which never runs it: it runs the host's vLLM-CPU venv instead)."""
    return ("#!/bin/sh\n"
            "# TEST IMAGE of slmfleet's local cluster: the real vLLM is not in this image. The node agent\n"
            "# of the local cluster's CPU process nodes runs the host's vLLM-CPU venv for `vllm`.\n"
            "echo 'slmfleet/vllm-cpu-test: this test image carries no vLLM; it runs only on the local "
            "cluster of slmfleet (e2e/node_agent), which runs the real vLLM-CPU for it' >&2\n"
            "exit 127\n")


def build_vllm_cpu_layer(rootfs: Path, layers_dir: Path, *, epoch: int) -> dict:
    """The vLLM-CPU test image's one layer over the base: its `vllm` launcher."""
    step("vllm-cpu-test: the `vllm` launcher (the image carries no vLLM)")
    launcher = rootfs / VLLM_CPU_LAUNCHER
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(vllm_cpu_launcher_text())
    launcher.chmod(0o755)
    return write_layer(rootfs, {VLLM_CPU_LAUNCHER}, layers_dir / "vllm-cpu.tar.gz", epoch=epoch, owner=(0, 0))


# crane ---------------------------------------------------------------------------------------------

class LoopbackRegistry:
    """`crane registry serve` on 127.0.0.1 and a free port, for the duration of a `with`."""

    def __init__(self, crane: Path):
        self.crane = crane
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def __enter__(self) -> LoopbackRegistry:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        self.proc = subprocess.Popen([str(self.crane), "registry", "serve", "--address", self.address],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                # No proxy from the environment: this must stay on loopback.
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(f"http://{self.address}/v2/", timeout=2):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"crane registry serve on {self.address} did not start") from None
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _labels(title: str, description: str, project: Project, rev: str, extra: dict[str, str]) -> dict[str, str]:
    labels = {
        "org.opencontainers.image.title": title,
        "org.opencontainers.image.description": description,
        "org.opencontainers.image.version": project.version,
        "org.opencontainers.image.revision": rev,
        "org.opencontainers.image.licenses": project.license,
        "org.opencontainers.image.vendor": "slmfleet",
        "io.slmfleet.base": f"debian {SUITE} (mmdebstrap {BASE_VARIANT} + {' '.join(BASE_PACKAGES)}, "
                            f"snapshot {BASE_SNAPSHOT}, key {base_key()})",
    }
    if url := source_url():
        labels["org.opencontainers.image.source"] = url
    labels.update(extra)
    return labels


def assemble(crane: Path, registry: str, repository: str, tag: str, layers: Sequence[Path],
             entrypoint: Sequence[str], labels: dict[str, str], layout: Path,
             env: dict[str, str] | None = None) -> dict:
    """crane append (OCI media types, empty base) + crane mutate (config) + crane pull --format oci."""
    ref = f"{registry}/{repository}:{tag}"
    _run([str(crane), "append", "--oci-empty-base", "-t", ref, *(a for p in layers for a in ("-f", str(p)))],
         capture_output=True)
    argv = [str(crane), "mutate", ref, "-t", ref, "--set-platform", PLATFORM,
            "--user", f"{NONROOT_UID}:{NONROOT_UID}", "--workdir", "/", "--entrypoint", ",".join(entrypoint)]
    for k, v in (IMAGE_ENV if env is None else env).items():
        argv += ["--env", f"{k}={v}"]
    for k, v in sorted(labels.items()):
        argv += ["--label", f"{k}={v}"]
    _run(argv, capture_output=True)
    shutil.rmtree(layout, ignore_errors=True)
    _run([str(crane), "pull", "--format", "oci", ref, str(layout)], capture_output=True)
    return read_layout(layout)


def read_layout(layout: Path) -> dict:
    """The one image of an OCI layout: digest, manifest, config, and compressedBytes (config plus
    layers, as stored: what a pull of it downloads)."""
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    digest = desc["digest"]
    manifest = json.loads(_blob(layout, digest))
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    size = manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
    return {"digest": digest, "manifest": manifest, "config": config, "compressedBytes": size}


def _blob(layout: Path, digest: str) -> bytes:
    algo, hexd = digest.split(":", 1)
    return (layout / "blobs" / algo / hexd).read_bytes()


# Entry point -------------------------------------------------------------------------------------

IMAGES = {
    "slmfleet": "slmfleet/slmfleet",
    "vllm-standin": "slmfleet/vllm-standin-test",
    "vllm-cpu": "slmfleet/vllm-cpu-test",
}


def build_all(out_dir: Path | str | None = None, *, reuse: bool = True, source: Path | str | None = None,
              revision_id: str | None = None, epoch: int | None = None) -> dict:
    """Builds the images into out_dir/images/<name>/ and writes out_dir/images.json.

    reuse=True: skip everything when the inputs (sources, constraints, base key, recipe) are
    unchanged since the last build into out_dir, and take the deps layer from the cache.
    reuse=False: rebuild the Python layers and the images (the base rootfs still comes from the
    cache: it is keyed by BASE_SNAPSHOT, not by commit).

    source: the tree to build from (default: this checkout, uncommitted changes included, which
    makes the revision `<HEAD>-dirty`); an export of a commit (`git archive`) with revision_id
    and epoch (its commit time) builds exactly that commit."""
    started = time.monotonic()
    out = Path(out_dir) if out_dir else ROOT / "build"
    out = out.resolve()
    digests = out / "images.json"
    project = Project.read(Path(source) if source else ROOT)
    rev = revision_id or revision(project.root)
    epoch = app_epoch(project.root) if epoch is None else int(epoch)
    crane = crane_path()
    inputs = cache_key({"sources": source_hash(project.root), "revision": rev, "epoch": epoch, "base": base_key(),
                        "python": PYTHON_RECIPE, "crane": str(crane), "labels_source": source_url(),
                        "build.py": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()})
    stamp = out / "images" / ".inputs"
    if reuse and digests.is_file() and stamp.is_file() and stamp.read_text() == inputs:
        try:
            doc = read_digests(digests)
            if all(read_layout(Path(e["layout"]))["digest"] == e["digest"] for e in doc["images"].values()):
                step(f"up to date (inputs {inputs}): {digests}")
                return doc
        except (OSError, ValueError, KeyError):
            pass
    if os.geteuid() != 0:
        raise SystemExit("images: building needs root (mmdebstrap --mode=root, chroot, unshare --mount)")

    base_layer, base_meta = ensure_base()
    with tempfile.TemporaryDirectory(prefix="slmfleet-images-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        layers_dir = Path(tmp) / "layers"
        rootfs.mkdir()
        layers_dir.mkdir()
        step("extracting the base")
        _extract(base_layer, rootfs)
        layers = build_python_layers(rootfs, base_meta, project, layers_dir, reuse_deps=reuse, epoch=epoch)
        layers["vllm-cpu"] = build_vllm_cpu_layer(rootfs, layers_dir, epoch=epoch)
        for name in ("deps", "app", "standin", "vllm-cpu"):
            step(f"layer {name}: {layers[name]['size'] / 1e6:.1f} MB compressed, {layers[name]['digest'][:19]}")
        step("assembling the images with crane on a loopback registry")
        results: dict[str, dict] = {}
        with LoopbackRegistry(crane) as reg:
            results["slmfleet"] = assemble(
                crane, reg.address, IMAGES["slmfleet"], project.version,
                [base_layer, layers_dir / "deps.tar.gz", layers_dir / "app.tar.gz"], ["slmfleet"],
                _labels("slmfleet", "slmfleet operator (slmfleet operator run) and weight loader (slmfleet load)",
                        project, rev, {}),
                out / "images" / "slmfleet")
            results["vllm-standin"] = assemble(
                crane, reg.address, IMAGES["vllm-standin"], project.version,
                [base_layer, layers_dir / "deps.tar.gz", layers_dir / "standin.tar.gz"], ["vllm", "serve"],
                _labels("vllm-standin-test",
                        "TEST STAND-IN, NOT vLLM: slmfleet's OpenAI-compatible stand-in for `vllm serve` "
                        "(e2e/standin/vllm.py), for the local test cluster only; it runs no model",
                        project, rev, {"io.slmfleet.test-only": "true"}),
                out / "images" / "vllm-standin")
            results["vllm-cpu"] = assemble(
                crane, reg.address, IMAGES["vllm-cpu"], project.version,
                [base_layer, layers_dir / "vllm-cpu.tar.gz"], ["vllm", "serve"],
                _labels("vllm-cpu-test",
                        "TEST IMAGE, carries no vLLM: the real vLLM CPU image's config (`vllm serve`), for the "
                        "local test cluster only, whose CPU process nodes run the real vLLM-CPU venv for it",
                        project, rev, {"io.slmfleet.test-only": "true"}),
                out / "images" / "vllm-cpu", env=VLLM_CPU_IMAGE_ENV)
    images = {name: {"repository": IMAGES[name], "tag": project.version, "digest": r["digest"],
                     "layout": str(out / "images" / name), "compressedBytes": r["compressedBytes"]}
              for name, r in results.items()}
    doc = digests_document(images, rev)
    digests.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    stamp.write_text(inputs)
    for image in doc["images"].values():
        step(f"{image['repository']}:{image['tag']}@{image['digest']} "
             f"({image['compressedBytes'] / 1e6:.1f} MB compressed)")
    step(f"done in {time.monotonic() - started:.0f} s -> {digests}")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m images.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "build", help="output directory (default: build/)")
    p.add_argument("--rebuild", action="store_true",
                   help="rebuild the Python layers and images even if nothing changed (the base stays cached)")
    args = p.parse_args(argv)
    build_all(args.out, reuse=not args.rebuild)
    return 0


if __name__ == "__main__":
    sys.exit(main())
