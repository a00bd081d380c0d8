"""The OCI images from images/build.py: reproducible, configured as agreed, minimal, and running
from a read-only root as uid 65532. No local cluster: the images are built (twice, from scratch,
into two temp dirs; only the cached Debian base is shared) and their rootfs run under chroot."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from images import build

pytestmark = pytest.mark.timeout(1200)

SITE = f"{build.VENV}/lib/python{build.PYTHON_VERSION}/site-packages".lstrip("/")  # as the layers name it
UID = build.NONROOT_UID


@pytest.fixture(scope="module")
def commit(tmp_path_factory) -> tuple[Path, str, int]:
    """HEAD, exported (`git archive`): both builds see the same commit even while the work tree
    changes under them."""
    sha, ct = subprocess.run(["git", "-C", str(build.ROOT), "log", "-1", "--format=%H %ct"], check=True,
                             capture_output=True, text=True).stdout.split()
    src = tmp_path_factory.mktemp("src")
    archive = subprocess.run(["git", "-C", str(build.ROOT), "archive", sha], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src, sha, int(ct)


@pytest.fixture(scope="module")
def builds(commit, tmp_path_factory) -> tuple[dict, dict]:
    if os.geteuid() != 0:
        pytest.fail("building images needs root (mmdebstrap, chroot, unshare --mount)")
    src, sha, ct = commit
    first = build.build_all(tmp_path_factory.mktemp("images-a"), reuse=False, source=src, revision_id=sha, epoch=ct)
    second = build.build_all(tmp_path_factory.mktemp("images-b"), reuse=False, source=src, revision_id=sha, epoch=ct)
    return first, second


@pytest.fixture(scope="module")
def images(builds) -> dict:
    return builds[0]["images"]


def _layout(image: dict) -> dict:
    return build.read_layout(Path(image["layout"]))


def _layer_blobs(image: dict) -> list[Path]:
    layout = Path(image["layout"])
    return [layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
            for layer in _layout(image)["manifest"]["layers"]]


def _names(image: dict) -> set[str]:
    names: set[str] = set()
    for blob in _layer_blobs(image):
        with tarfile.open(blob, "r:gz") as tar:
            names.update(m.name for m in tar.getmembers())
    return names


@pytest.fixture(scope="module")
def rootfs(images, tmp_path_factory) -> dict[str, Path]:
    """Each image's layers extracted in order (none of them has whiteouts)."""
    out = {}
    for name, image in images.items():
        root = tmp_path_factory.mktemp(f"rootfs-{name}")
        root.chmod(0o755)  # as a container runtime makes it (the layers carry no entry for /)
        for blob in _layer_blobs(image):
            subprocess.run(["tar", "--numeric-owner", "-xzf", str(blob), "-C", str(root)], check=True)
        out[name] = root
    return out


def _run(root: Path, argv: list[str], image: dict, **kw) -> subprocess.CompletedProcess:
    """argv as the image runs it: its Env, uid 65532, read-only root, tmpfs on /tmp."""
    env = dict(e.split("=", 1) for e in _layout(image)["config"]["config"]["Env"])
    return subprocess.run(build.chroot_argv(root, argv, env=env, userspec=f"{UID}:{UID}", read_only=True),
                          capture_output=True, text=True, timeout=120, **kw)


def test_two_builds_from_scratch_give_the_same_digests(builds, commit):
    first, second = builds
    assert first["revision"] == second["revision"] == commit[1]
    for name in ("slmfleet", "vllm-standin"):
        a, b = first["images"][name], second["images"][name]
        assert a["layout"] != b["layout"]
        la, lb = _layout(a), _layout(b)
        assert [x["digest"] for x in la["manifest"]["layers"]] == [x["digest"] for x in lb["manifest"]["layers"]]
        assert la["config"] == lb["config"]
        assert a["digest"] == b["digest"]
        assert a["compressedBytes"] == b["compressedBytes"]


def test_digests_file_has_the_agreed_shape(builds, tmp_path_factory):
    doc = builds[0]
    layout_root = Path(doc["images"]["slmfleet"]["layout"]).parent.parent
    assert build.read_digests(layout_root / "images.json") == doc
    assert doc["images"]["slmfleet"]["repository"] == "slmfleet/slmfleet"
    assert doc["images"]["vllm-standin"]["repository"] == "slmfleet/vllm-standin-test"
    for image in doc["images"].values():
        assert image["tag"] == build.Project.read().version
        assert _layout(image)["digest"] == image["digest"]
        assert image["compressedBytes"] == _layout(image)["compressedBytes"]


def test_operator_image_config(images, builds):
    cfg = _layout(images["slmfleet"])["config"]
    assert (cfg["os"], cfg["architecture"]) == ("linux", "amd64")
    c = cfg["config"]
    assert c["User"] == f"{UID}:{UID}"
    assert c["Entrypoint"] == ["slmfleet"]
    assert not c.get("Cmd")
    env = dict(e.split("=", 1) for e in c["Env"])
    assert env["PATH"].startswith(f"{build.VENV}/bin:")
    for k, v in {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                 "DO_NOT_TRACK": "1", "HOME": "/tmp"}.items():
        assert env[k] == v
    labels = c["Labels"]
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.revision"] == builds[0]["revision"]
    assert labels["org.opencontainers.image.title"] == "slmfleet"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    # No build time anywhere in the config.
    assert cfg["created"].startswith("0001-01-01")
    assert all(h.get("created", "0001").startswith("0001") for h in cfg.get("history", []))


def test_standin_image_config_says_it_is_a_test_standin(images):
    c = _layout(images["vllm-standin"])["config"]["config"]
    assert c["Entrypoint"] == ["vllm", "serve"]
    assert c["User"] == f"{UID}:{UID}"
    assert c["Labels"]["io.slmfleet.test-only"] == "true"
    assert "NOT vLLM" in c["Labels"]["org.opencontainers.image.description"]


def test_images_share_the_base_and_deps_layers(images):
    op = [x["digest"] for x in _layout(images["slmfleet"])["manifest"]["layers"]]
    st = [x["digest"] for x in _layout(images["vllm-standin"])["manifest"]["layers"]]
    assert len(op) == len(st) == 3
    assert op[:2] == st[:2] and op[2] != st[2]


def test_every_module_has_its_bytecode_and_nothing_else_is_shipped(images):
    names = _names(images["slmfleet"])
    sources = sorted(n for n in names if n.startswith(f"{SITE}/slmfleet/") and n.endswith(".py"))
    assert len(sources) > 20
    missing = [s for s in sources
               if f"{os.path.dirname(s)}/__pycache__/{os.path.basename(s)[:-3]}.cpython-311.pyc" not in names]
    assert missing == []
    # Dependencies and the standard library too.
    for src in (f"{SITE}/kopf/__init__.py", f"{SITE}/pydantic/main.py", "usr/lib/python3.11/json/decoder.py"):
        assert src in names
        assert f"{os.path.dirname(src)}/__pycache__/{os.path.basename(src)[:-3]}.cpython-311.pyc" in names
    assert [n for n in names if n.startswith("var/lib/apt/lists/") or n.startswith("var/cache/apt/")] == []
    doc = [n for n in names if n.startswith("usr/share/doc/")]
    # Only the packages' copyright files (the licences of what the image redistributes).
    assert [n for n in doc if n.count("/") > 3 and not n.endswith("/copyright")] == []
    assert [n for n in names if n.startswith(("usr/share/man/", "usr/share/info/", "usr/share/locale/"))] == []
    assert [n for n in names if "/.cache/pip" in f"/{n}" or n.startswith("root/.cache")] == []
    assert [n for n in names if n.startswith("dev/") or n.startswith("tmp/")] == []
    assert not any(n.endswith(".whl") for n in names)


def test_bytecode_is_hash_based_and_unchecked(rootfs, images):
    root = rootfs["slmfleet"]
    pycs = list((root / SITE / "slmfleet").rglob("*.pyc"))
    pycs += list((root / "usr/lib/python3.11/json").rglob("*.pyc"))
    pycs += list((root / SITE / "aiohttp").rglob("*.pyc"))
    assert len(pycs) > 30
    # PEP 552: flags word 1 = hash-based, source not checked.
    assert sorted({int.from_bytes(p.read_bytes()[4:8], "little") for p in pycs}) == [1]


def test_operator_image_runs_from_a_read_only_root_as_65532(rootfs, images):
    root, image = rootfs["slmfleet"], images["slmfleet"]
    # The root really is read-only and the process is uid 65532.
    probe = _run(root, ["/usr/bin/python3", "-c",
                        "import os; print(os.getuid(), os.getgid());"
                        "open('/tmp/ok', 'w').write('x');"
                        "open('/opt/slmfleet/x', 'w')"], image)
    assert probe.stdout.split() == [str(UID), str(UID)]
    assert "Read-only file system" in probe.stderr, probe.stderr
    # The console script, through PATH, as the entrypoint runs it.
    helped = _run(root, ["slmfleet", "--help"], image)
    assert helped.returncode == 0, helped.stderr
    assert "usage" in helped.stdout.lower()
    # Every module of the package imports, each one from its bytecode (python -v names the .pyc).
    script = ("import importlib, pkgutil, slmfleet\n"
              "mods = ['slmfleet'] + [m.name for m in pkgutil.walk_packages(slmfleet.__path__, 'slmfleet.')]\n"
              "for m in mods: importlib.import_module(m)\n"
              "print('MODULES', len(mods))\n")
    imported = _run(root, ["python", "-v", "-c", script], image)
    assert imported.returncode == 0, imported.stderr[-3000:]
    count = int(imported.stdout.split("MODULES", 1)[1].split()[0])
    from_pyc = {line.split("'")[1] for line in imported.stderr.splitlines()
                if line.startswith("# code object from") and "/site-packages/slmfleet/" in line}
    assert len(from_pyc) == count, f"{count} modules, {len(from_pyc)} loaded from bytecode"
    assert all(p.endswith(".cpython-311.pyc") for p in from_pyc)


def test_loader_reports_its_usage(rootfs, images):
    done = _run(rootfs["slmfleet"], ["slmfleet", "load", "--help"], images["slmfleet"])
    assert done.returncode == 0, done.stderr
    assert "--digest" in done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_standin_image_serves_from_a_read_only_root(rootfs, images):
    root, image = rootfs["vllm-standin"], images["vllm-standin"]
    helped = _run(root, ["vllm", "serve", "--help"], image)
    assert helped.returncode == 0, helped.stderr
    assert "vllm serve" in helped.stdout
    model = root / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 8, "max_position_embeddings": 4096}))
    (model / "standin.json").write_text(json.dumps({"default_completion": "hello", "latency_ms": {"mean": 1, "p95": 2}}))
    port = _free_port()
    env = dict(e.split("=", 1) for e in _layout(image)["config"]["config"]["Env"])
    argv = build.chroot_argv(root, ["vllm", "serve", "/models/m", "--host", "127.0.0.1", "--port", str(port)],
                             env=env, userspec=f"{UID}:{UID}", read_only=True)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with opener.open(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    models = json.load(r)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the stand-in did not answer within 60 s"
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == ["/models/m"]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_layout_pushes_to_a_registry_with_its_digest(images):
    crane = build.crane_path()
    with build.LoopbackRegistry(crane) as reg:
        for image in images.values():
            ref = f"{reg.address}/{image['repository']}:{image['tag']}"
            subprocess.run([str(crane), "push", image["layout"], ref], check=True, capture_output=True, timeout=120)
            got = subprocess.run([str(crane), "digest", ref], check=True, capture_output=True, text=True).stdout.strip()
            assert got == image["digest"]
