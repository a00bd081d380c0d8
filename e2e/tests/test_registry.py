"""The node agent's pulls against a real OCI registry (`crane registry serve` on loopback), and
the service-account mount namespace run for real. No cluster needed."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import aiohttp
import pytest

from e2e.cluster import binaries, urlopen
from e2e.node_agent import images, registry, spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    crane = binaries()["crane"]
    if not crane.exists():
        subprocess.run([str(Path(__file__).parents[1] / "build-binaries.sh"), "crane"], check=True)
    host = f"127.0.0.1:{_free_port()}"
    proc = subprocess.Popen([str(crane), "registry", "serve", f"--address={host}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            urlopen(f"http://{host}/v2/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("crane registry serve did not start") from None
            time.sleep(0.1)
    # A one-file image with a config like the project's images.
    layer = tmp_path_factory.mktemp("layer") / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        data = b"hello\n"
        info = tarfile.TarInfo("etc/hello")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    ref = f"{host}/test/slmfleet/slmfleet:1"
    subprocess.run([str(crane), "append", "--oci-empty-base", "-f", str(layer), "-t", ref], check=True,
                   capture_output=True)
    out = subprocess.run([str(crane), "mutate", ref, "--entrypoint", "slmfleet", "--cmd", "--help",
                          "--user", "65532:65532", "--env", "HF_HUB_OFFLINE=1", "--set-platform", "linux/amd64",
                          "-t", ref], check=True, capture_output=True, text=True).stdout.strip()
    yield host, out  # out: host/repo@sha256:...
    proc.kill()
    proc.wait()


def _pull(host: str, image: str, auth: str | None = None) -> registry.PulledImage:
    async def go() -> registry.PulledImage:
        async with aiohttp.ClientSession() as session:
            return await registry.Registry(host).pull(session, image, auth)
    return asyncio.run(go())


def test_an_image_is_pulled_by_digest_and_its_config_is_what_was_pushed(served):
    host, pushed = served
    digest = pushed.split("@", 1)[1]
    pulled = _pull(host, f"{host}/test/slmfleet/slmfleet:1@{digest}")
    assert pulled.digest == digest
    assert pulled.entrypoint == ("slmfleet",) and pulled.cmd == ("--help",)
    assert pulled.user == "65532:65532" and pulled.env["HF_HUB_OFFLINE"] == "1"
    assert pulled.image_id == f"{host}/test/slmfleet/slmfleet@{digest}"
    # The tag resolves to the same manifest; an open registry takes a pull with credentials too.
    assert _pull(host, f"{host}/test/slmfleet/slmfleet:1", auth="Basic dTpw").digest == digest
    # What the node runs comes from that config: entrypoint, then the local stand-in for it.
    local = images.from_pulled(pulled)
    assert images.resolve_argv(local, None, None)[1:] == ["--help"]


def test_a_digest_the_registry_does_not_have_is_not_found(served):
    host, _ = served
    missing = "sha256:" + "0" * 64
    with pytest.raises(registry.PullError, match="not found"):
        _pull(host, f"{host}/test/slmfleet/slmfleet:1@{missing}")
    with pytest.raises(registry.PullError, match="not found"):
        _pull(host, f"{host}/test/nothing/here:1")


def test_other_registries_are_never_contacted(served):
    host, _ = served
    with pytest.raises(registry.PullError, match=f"reaches only its loopback registry {host}"):
        _pull(host, "docker.io/vllm/vllm-openai:v0.32.0")
    with pytest.raises(registry.PullError, match="reaches only no registry"):
        _pull(None, f"{host}/test/slmfleet/slmfleet:1")  # type: ignore[arg-type]


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root (CI and the local cluster run as root)")
def test_the_service_account_directory_is_bind_mounted_read_only_for_the_container_alone(tmp_path):
    token_dir = tmp_path / "token"
    token_dir.mkdir()
    (token_dir / "token").write_text("t0ken")
    os.makedirs(spec.SECRETS_DIR, exist_ok=True)
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    script = f"cat {sa}/token; echo; touch {sa}/x 2>/dev/null && echo writable || echo read-only"
    argv = spec.mount_namespace_argv({sa: str(token_dir)}, ["sh", "-c", script], {sa})
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["t0ken", "read-only"]
    assert not Path(sa, "token").exists()  # the host's /run is untouched
